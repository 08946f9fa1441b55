//! Fixed-point readings as instruments print them: every field of a line with the same number of decimals.
//!
//! Serial lines without checksums (GRBL status reports, SCPI readings) still carry one redundancy: an
//! instrument prints its numbers at a fixed resolution, so a field with another count of decimals, or
//! without a digit on either side of its point, lost or gained bytes on the wire.

/// A field that cannot be what the instrument printed, naming the field and its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FixedPointError {
    #[error("{field} {value:?} has no decimal point")]
    NoPoint { field: String, value: String },
    #[error("{field} {value:?} has no digits before the point")]
    NoDigitsBefore { field: String, value: String },
    #[error("{field} {value:?} has no digits after the point")]
    NoDigitsAfter { field: String, value: String },
    #[error("{field} {value:?} has {decimals} decimals where {first} has {expected}")]
    DecimalsDiffer {
        field: String,
        value: String,
        decimals: usize,
        first: String,
        expected: usize,
    },
}

/// The number of decimals every field shares, or the first field that breaks the rule; `None` for no
/// fields. `signs` are the sign characters the instrument may print before a number; `label` names the
/// i-th field in errors (an axis, "field 2").
pub fn common_decimals<'a>(
    fields: impl IntoIterator<Item = &'a str>,
    signs: &[char],
    label: impl Fn(usize) -> String,
) -> Result<Option<usize>, FixedPointError> {
    let mut decimals = None;
    for (i, value) in fields.into_iter().enumerate() {
        let named = || (label(i), value.to_owned());
        let digits = value.strip_prefix(signs).unwrap_or(value);
        let Some((whole, fraction)) = digits.split_once('.') else {
            let (field, value) = named();
            return Err(FixedPointError::NoPoint { field, value });
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            let (field, value) = named();
            return Err(FixedPointError::NoDigitsBefore { field, value });
        }
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            let (field, value) = named();
            return Err(FixedPointError::NoDigitsAfter { field, value });
        }
        match decimals {
            None => decimals = Some(fraction.len()),
            Some(expected) if expected != fraction.len() => {
                let (field, value) = named();
                return Err(FixedPointError::DecimalsDiffer {
                    field,
                    value,
                    decimals: fraction.len(),
                    first: label(0),
                    expected,
                });
            }
            Some(_) => {}
        }
    }
    Ok(decimals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(i: usize) -> String {
        ["X", "Y", "Z"]
            .get(i)
            .copied()
            .unwrap_or("extra")
            .to_owned()
    }

    #[test]
    fn fields_sharing_their_decimals_give_the_count() {
        assert_eq!(
            common_decimals(["1.500", "-0.250"], &['-'], axis),
            Ok(Some(3))
        );
        assert_eq!(common_decimals([], &['-'], axis), Ok(None));
    }

    #[test]
    fn each_kind_of_damage_names_its_field() {
        let cases: [(&[&str], FixedPointError); 4] = [
            (
                &["1.5", "20"],
                FixedPointError::NoPoint {
                    field: "Y".into(),
                    value: "20".into(),
                },
            ),
            (
                &[".5"],
                FixedPointError::NoDigitsBefore {
                    field: "X".into(),
                    value: ".5".into(),
                },
            ),
            (
                &["1.5", "2.5", "3."],
                FixedPointError::NoDigitsAfter {
                    field: "Z".into(),
                    value: "3.".into(),
                },
            ),
            (
                &["1.50", "2.5"],
                FixedPointError::DecimalsDiffer {
                    field: "Y".into(),
                    value: "2.5".into(),
                    decimals: 1,
                    first: "X".into(),
                    expected: 2,
                },
            ),
        ];
        for (fields, expected) in cases {
            assert_eq!(
                common_decimals(fields.iter().copied(), &['-'], axis),
                Err(expected)
            );
        }
    }

    #[test]
    fn only_the_given_signs_are_accepted() {
        assert_eq!(common_decimals(["+1.5"], &['-', '+'], axis), Ok(Some(1)));
        assert!(matches!(
            common_decimals(["+1.5"], &['-'], axis),
            Err(FixedPointError::NoDigitsBefore { .. })
        ));
    }
}
