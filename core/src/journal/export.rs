//! A run's results as files: JSON Lines (one result per line, as journaled) and CSV in long form. One
//! writer for `labctl runs export` and the browser console's downloads, so the two never differ.

use std::io::Write;

use super::read::ResultRow;

/// JSON Lines: one result per line, as the journal holds it.
pub fn write_jsonl(rows: &[ResultRow], out: &mut dyn Write) -> std::io::Result<()> {
    rows.iter()
        .try_for_each(|r| writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default()))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// CSV in long form: one row per scalar value, so a spectrum becomes one row per wavelength.
pub fn write_csv(rows: &[ResultRow], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "run_id,seq,name,step,instrument,serial,firmware,at_ms,quantity,index,value"
    )?;
    for r in rows {
        let serial = r.identity["serial"].as_str().unwrap_or("");
        let firmware = r.identity["firmware"].as_str().unwrap_or("");
        let mut line = |quantity: &str, index: String, value: String| {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.run_id),
                r.seq,
                csv_field(&r.name),
                csv_field(&r.step),
                csv_field(&r.instrument),
                csv_field(serial),
                csv_field(firmware),
                r.at_ms,
                csv_field(quantity),
                index,
                csv_field(&value)
            )
        };
        let Some(obj) = r.value.as_object() else {
            line("value", String::new(), r.value.to_string())?;
            continue;
        };
        // Spectra: one row per point, wavelength as the index.
        if let (Some(w), Some(a)) = (
            obj.get("wavelengths_nm").and_then(|v| v.as_array()),
            obj.get("absorbance").and_then(|v| v.as_array()),
        ) {
            for (wl, ab) in w.iter().zip(a) {
                line("absorbance", wl.to_string(), ab.to_string())?;
            }
            continue;
        }
        for (k, v) in obj {
            if k != "outcome" {
                line(
                    k,
                    String::new(),
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )?;
            }
        }
    }
    Ok(())
}
