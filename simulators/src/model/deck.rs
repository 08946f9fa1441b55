//! The deck: named positions (rack A1..D6, weigh station W1, stir station H1) and the vials on it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{ConfigError, check_finite, check_positive};

/// Homogeneity at or above which a vial counts as mixed.
pub const MIXED_THRESHOLD: f64 = 0.95;

/// One of the three dye stocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dye {
    /// Red dye stock (absorbs near 520 nm).
    Red,
    /// Yellow dye stock (absorbs near 430 nm).
    Yellow,
    /// Blue dye stock (absorbs near 620 nm).
    Blue,
}

impl Dye {
    /// All dyes in per-dye array order.
    pub const ALL: [Dye; 3] = [Dye::Red, Dye::Yellow, Dye::Blue];

    /// Index of this dye in per-dye arrays (red 0, yellow 1, blue 2).
    pub fn index(self) -> usize {
        match self {
            Dye::Red => 0,
            Dye::Yellow => 1,
            Dye::Blue => 2,
        }
    }

    /// Lower-case name ("red", "yellow", "blue").
    pub fn name(self) -> &'static str {
        match self {
            Dye::Red => "red",
            Dye::Yellow => "yellow",
            Dye::Blue => "blue",
        }
    }
}

/// A liquid a pump can deliver into a vial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liquid {
    /// A dye stock.
    Dye(Dye),
    /// Plain water (diluent).
    Water,
}

/// Liquid in a vial: volume of each dye stock (red, yellow, blue) plus water, in uL.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Contents {
    /// Volume of each dye stock in uL, indexed by [`Dye::index`].
    pub dye_ul: [f64; 3],
    /// Volume of water in uL.
    pub water_ul: f64,
}

fn sanitize_volume(ul: f64) -> f64 {
    if ul.is_finite() && ul > 0.0 { ul } else { 0.0 }
}

impl Contents {
    /// Contents from dye volumes and water (negative or non-finite volumes count as 0).
    pub fn new(dye_ul: [f64; 3], water_ul: f64) -> Self {
        Self {
            dye_ul: dye_ul.map(sanitize_volume),
            water_ul: sanitize_volume(water_ul),
        }
    }

    /// Total liquid volume in uL.
    pub fn total_ul(&self) -> f64 {
        self.dye_ul.iter().sum::<f64>() + self.water_ul
    }

    /// Volume of one liquid in uL.
    pub fn volume_of(&self, liquid: Liquid) -> f64 {
        match liquid {
            Liquid::Dye(d) => self.dye_ul[d.index()],
            Liquid::Water => self.water_ul,
        }
    }

    /// True when the vial holds no liquid.
    pub fn is_empty(&self) -> bool {
        self.total_ul() <= 0.0
    }

    /// True when nothing but `liquid` is present.
    fn is_only(&self, liquid: Liquid) -> bool {
        let others_dye = Dye::ALL
            .iter()
            .filter(|&&d| Liquid::Dye(d) != liquid)
            .all(|&d| self.dye_ul[d.index()] <= 0.0);
        others_dye && (liquid == Liquid::Water || self.water_ul <= 0.0)
    }

    fn add(&mut self, liquid: Liquid, ul: f64) {
        match liquid {
            Liquid::Dye(d) => self.dye_ul[d.index()] += ul,
            Liquid::Water => self.water_ul += ul,
        }
    }
}

/// A named deck position with its work coordinates in mm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeckPosition {
    /// Position name, e.g. "A1", "W1", "H1".
    pub name: String,
    /// X coordinate (mm).
    pub x_mm: f64,
    /// Y coordinate (mm).
    pub y_mm: f64,
    /// Work (down) Z coordinate (mm).
    pub z_mm: f64,
}

impl DeckPosition {
    /// A position from a name and coordinates.
    pub fn new(name: impl Into<String>, x_mm: f64, y_mm: f64, z_mm: f64) -> Self {
        Self {
            name: name.into(),
            x_mm,
            y_mm,
            z_mm,
        }
    }
}

/// Where a vial is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VialLocation {
    /// Standing in the named deck position.
    Position(String),
    /// Held by the gantry gripper.
    Gripper,
}

/// A vial: tare, capacity, liquid contents, temperature and how well mixed it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Vial {
    /// Vial identifier chosen by whoever placed it.
    pub id: String,
    /// Where the vial is.
    pub location: VialLocation,
    /// Mass of the empty vial (g).
    pub tare_g: f64,
    /// Largest liquid volume the vial holds (uL).
    pub capacity_ul: f64,
    /// Liquid in the vial.
    pub contents: Contents,
    /// Liquid temperature (C).
    pub temperature_c: f64,
    /// Homogeneity 0..=1 (1 = fully mixed); adding a different liquid lowers it, stirring raises it.
    pub homogeneity: f64,
}

impl Vial {
    /// Mass of the liquid (g) at the given density (g/mL).
    pub fn liquid_mass_g(&self, density_g_per_ml: f64) -> f64 {
        self.contents.total_ul() * 1e-3 * density_g_per_ml
    }

    /// Mass of vial plus liquid (g).
    pub fn mass_g(&self, density_g_per_ml: f64) -> f64 {
        self.tare_g + self.liquid_mass_g(density_g_per_ml)
    }

    /// True when homogeneity has reached [`MIXED_THRESHOLD`].
    pub fn is_mixed(&self) -> bool {
        self.homogeneity >= MIXED_THRESHOLD
    }

    /// The named position the vial stands in, if not held.
    pub fn position(&self) -> Option<&str> {
        match &self.location {
            VialLocation::Position(p) => Some(p),
            VialLocation::Gripper => None,
        }
    }

    /// Adds liquid at `temperature_c`; returns the volume that did not fit (overflow, uL).
    pub fn add_liquid(&mut self, liquid: Liquid, ul: f64, temperature_c: f64) -> f64 {
        let ul = sanitize_volume(ul);
        let before = self.contents.total_ul();
        let room = (self.capacity_ul - before).max(0.0);
        let accepted = ul.min(room);
        if accepted > 0.0 {
            if before <= 0.0 {
                self.homogeneity = 1.0;
                self.temperature_c = temperature_c;
            } else {
                if !self.contents.is_only(liquid) {
                    self.homogeneity *= before / (before + accepted);
                }
                self.temperature_c =
                    (self.temperature_c * before + temperature_c * accepted) / (before + accepted);
            }
            self.contents.add(liquid, accepted);
        }
        ul - accepted
    }

    /// Mixes by `exponent` (homogeneity h becomes 1 - (1 - h)·e^-exponent).
    pub fn mix(&mut self, exponent: f64) {
        if exponent.is_finite() && exponent > 0.0 {
            self.homogeneity = 1.0 - (1.0 - self.homogeneity) * (-exponent).exp();
        }
        self.homogeneity = self.homogeneity.clamp(0.0, 1.0);
    }

    /// First-order relaxation of the temperature toward `target_c` over `dt_s` with time constant `tau_s`.
    pub fn relax_temperature(&mut self, target_c: f64, dt_s: f64, tau_s: f64) {
        self.temperature_c = relax(self.temperature_c, target_c, dt_s, tau_s);
    }
}

/// First-order step: `x` moves toward `target` by 1 - e^(-dt/tau).
pub(crate) fn relax(x: f64, target: f64, dt_s: f64, tau_s: f64) -> f64 {
    if tau_s > 0.0 && dt_s.is_finite() {
        target + (x - target) * (-dt_s / tau_s).exp()
    } else {
        target
    }
}

/// Deck layout and vial defaults (the lab file supplies the positions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeckConfig {
    /// All named positions.
    pub positions: Vec<DeckPosition>,
    /// Position on the balance pan.
    pub weigh_station: String,
    /// Position on the hotplate stirrer.
    pub stir_station: String,
    /// Safe travel height (mm).
    pub safe_z_mm: f64,
    /// The gripper can pick or place a vial only with the head at or below this height (mm).
    pub grip_z_max_mm: f64,
    /// The head is "at" a position when within this XY distance of it (mm).
    pub position_tolerance_mm: f64,
    /// Tare mass of a fresh vial (g).
    pub vial_tare_g: f64,
    /// Capacity of a fresh vial (uL).
    pub vial_capacity_ul: f64,
    /// Temperature of a fresh vial (C).
    pub vial_temperature_c: f64,
    /// Time constant of passive mixing by diffusion, without stirring (s).
    pub passive_mix_s: f64,
    /// Time constant with which vials off the hotplate relax to ambient temperature (s).
    pub cooling_tau_s: f64,
}

impl Default for DeckConfig {
    fn default() -> Self {
        Self::sim_default()
    }
}

impl DeckConfig {
    /// The simulated lab's deck: rack A1..D6 (origin 20,20 mm, pitch 20 mm), W1 at (200,40), H1 at (200,100).
    pub fn sim_default() -> Self {
        let mut positions = Vec::with_capacity(26);
        for (r, row) in ['A', 'B', 'C', 'D'].into_iter().enumerate() {
            for col in 1..=6u32 {
                positions.push(DeckPosition::new(
                    format!("{row}{col}"),
                    20.0 + 20.0 * f64::from(col - 1),
                    20.0 + 20.0 * r as f64,
                    0.0,
                ));
            }
        }
        positions.push(DeckPosition::new("W1", 200.0, 40.0, 0.0));
        positions.push(DeckPosition::new("H1", 200.0, 100.0, 0.0));
        Self {
            positions,
            weigh_station: "W1".into(),
            stir_station: "H1".into(),
            safe_z_mm: 50.0,
            grip_z_max_mm: 5.0,
            position_tolerance_mm: 1.0,
            vial_tare_g: 10.0,
            vial_capacity_ul: 20_000.0,
            vial_temperature_c: 22.0,
            passive_mix_s: 1800.0,
            cooling_tau_s: 600.0,
        }
    }

    /// Checks names are unique, stations exist and all numbers are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, p) in self.positions.iter().enumerate() {
            if p.name.is_empty() {
                return Err(ConfigError::invalid(
                    "deck.positions",
                    "empty position name",
                ));
            }
            if self.positions[..i].iter().any(|q| q.name == p.name) {
                return Err(ConfigError::invalid(
                    "deck.positions",
                    format!("duplicate position {}", p.name),
                ));
            }
            for v in [p.x_mm, p.y_mm, p.z_mm] {
                check_finite(&format!("deck.positions.{}", p.name), v)?;
            }
        }
        for (field, name) in [
            ("deck.weigh_station", &self.weigh_station),
            ("deck.stir_station", &self.stir_station),
        ] {
            if !self.positions.iter().any(|p| &p.name == name) {
                return Err(ConfigError::invalid(
                    field,
                    format!("no position named {name}"),
                ));
            }
        }
        check_finite("deck.safe_z_mm", self.safe_z_mm)?;
        check_finite("deck.grip_z_max_mm", self.grip_z_max_mm)?;
        check_finite("deck.vial_temperature_c", self.vial_temperature_c)?;
        check_positive("deck.position_tolerance_mm", self.position_tolerance_mm)?;
        check_positive("deck.vial_capacity_ul", self.vial_capacity_ul)?;
        check_positive("deck.passive_mix_s", self.passive_mix_s)?;
        check_positive("deck.cooling_tau_s", self.cooling_tau_s)?;
        if !(self.vial_tare_g.is_finite() && self.vial_tare_g >= 0.0) {
            return Err(ConfigError::invalid(
                "deck.vial_tare_g",
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}

/// A deck operation that cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeckError {
    /// No position with this name.
    #[error("unknown deck position {0}")]
    UnknownPosition(String),
    /// A vial already stands in this position.
    #[error("position {0} is occupied")]
    Occupied(String),
    /// No vial stands in this position.
    #[error("no vial at position {0}")]
    EmptyPosition(String),
    /// A vial with this id already exists.
    #[error("a vial named {0} already exists")]
    DuplicateVial(String),
    /// No vial with this id.
    #[error("no vial named {0}")]
    NoSuchVial(String),
    /// Vial ids must not be empty.
    #[error("empty vial id")]
    EmptyId,
    /// The gripper already holds a vial.
    #[error("the gripper already holds a vial")]
    GripperFull,
    /// The gripper holds no vial.
    #[error("the gripper holds no vial")]
    GripperEmpty,
}

/// The deck: positions and the vials standing in them or held by the gripper.
#[derive(Debug, Clone)]
pub struct Deck {
    config: DeckConfig,
    vials: Vec<Vial>,
}

impl Deck {
    /// A deck from a validated layout, with no vials.
    pub fn new(config: DeckConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            vials: Vec::new(),
        })
    }

    /// The simulated lab's default deck ([`DeckConfig::sim_default`]), empty.
    pub fn sim_default() -> Self {
        Self {
            config: DeckConfig::sim_default(),
            vials: Vec::new(),
        }
    }

    /// The deck layout.
    pub fn config(&self) -> &DeckConfig {
        &self.config
    }

    /// All positions.
    pub fn positions(&self) -> &[DeckPosition] {
        &self.config.positions
    }

    /// The position with this name.
    pub fn position(&self, name: &str) -> Option<&DeckPosition> {
        self.config.positions.iter().find(|p| p.name == name)
    }

    /// The position nearest to (x, y) within the position tolerance.
    pub fn position_near(&self, x_mm: f64, y_mm: f64) -> Option<&DeckPosition> {
        let tol = self.config.position_tolerance_mm;
        self.config
            .positions
            .iter()
            .map(|p| (p, (p.x_mm - x_mm).hypot(p.y_mm - y_mm)))
            .filter(|(_, d)| *d <= tol)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(p, _)| p)
    }

    /// Places a fresh, empty vial (default tare, capacity, temperature) in an empty position.
    pub fn add_vial(&mut self, id: &str, position: &str) -> Result<&Vial, DeckError> {
        if id.is_empty() {
            return Err(DeckError::EmptyId);
        }
        if self.position(position).is_none() {
            return Err(DeckError::UnknownPosition(position.into()));
        }
        if self.vial_at(position).is_some() {
            return Err(DeckError::Occupied(position.into()));
        }
        if self.vial(id).is_some() {
            return Err(DeckError::DuplicateVial(id.into()));
        }
        self.vials.push(Vial {
            id: id.into(),
            location: VialLocation::Position(position.into()),
            tare_g: self.config.vial_tare_g,
            capacity_ul: self.config.vial_capacity_ul,
            contents: Contents::default(),
            temperature_c: self.config.vial_temperature_c,
            homogeneity: 1.0,
        });
        Ok(&self.vials[self.vials.len() - 1])
    }

    /// Takes a vial off the deck (or out of the gripper) and returns it.
    pub fn remove_vial(&mut self, id: &str) -> Result<Vial, DeckError> {
        let k = self
            .vials
            .iter()
            .position(|v| v.id == id)
            .ok_or_else(|| DeckError::NoSuchVial(id.into()))?;
        Ok(self.vials.remove(k))
    }

    /// The vial with this id.
    pub fn vial(&self, id: &str) -> Option<&Vial> {
        self.vials.iter().find(|v| v.id == id)
    }

    /// All vials, in the order they were added.
    pub fn vials(&self) -> &[Vial] {
        &self.vials
    }

    /// The vial standing in a position.
    pub fn vial_at(&self, position: &str) -> Option<&Vial> {
        self.index_at(position).map(|k| &self.vials[k])
    }

    /// The vial held by the gripper.
    pub fn held_vial(&self) -> Option<&Vial> {
        self.held_index().map(|k| &self.vials[k])
    }

    /// Moves the vial standing in `position` into the gripper.
    pub fn pick(&mut self, position: &str) -> Result<(), DeckError> {
        if self.held_index().is_some() {
            return Err(DeckError::GripperFull);
        }
        let k = self
            .index_at(position)
            .ok_or_else(|| DeckError::EmptyPosition(position.into()))?;
        self.vials[k].location = VialLocation::Gripper;
        Ok(())
    }

    /// Puts the held vial down in an empty `position`.
    pub fn place(&mut self, position: &str) -> Result<(), DeckError> {
        let k = self.held_index().ok_or(DeckError::GripperEmpty)?;
        if self.position(position).is_none() {
            return Err(DeckError::UnknownPosition(position.into()));
        }
        if self.vial_at(position).is_some() {
            return Err(DeckError::Occupied(position.into()));
        }
        self.vials[k].location = VialLocation::Position(position.into());
        Ok(())
    }

    pub(crate) fn index_at(&self, position: &str) -> Option<usize> {
        self.vials
            .iter()
            .position(|v| v.position() == Some(position))
    }

    pub(crate) fn held_index(&self) -> Option<usize> {
        self.vials
            .iter()
            .position(|v| v.location == VialLocation::Gripper)
    }

    pub(crate) fn vials_mut(&mut self) -> &mut [Vial] {
        &mut self.vials
    }

    pub(crate) fn remove_index(&mut self, k: usize) -> Option<Vial> {
        (k < self.vials.len()).then(|| self.vials.remove(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_default_layout_matches_the_lab() {
        let deck = Deck::sim_default();
        assert_eq!(deck.positions().len(), 26);
        let at = |n: &str| {
            let p = deck.position(n).unwrap();
            (p.x_mm, p.y_mm, p.z_mm)
        };
        assert_eq!(at("A1"), (20.0, 20.0, 0.0));
        assert_eq!(at("A6"), (120.0, 20.0, 0.0));
        assert_eq!(at("B3"), (60.0, 40.0, 0.0));
        assert_eq!(at("D6"), (120.0, 80.0, 0.0));
        assert_eq!(at("W1"), (200.0, 40.0, 0.0));
        assert_eq!(at("H1"), (200.0, 100.0, 0.0));
        assert_eq!(deck.position_near(60.4, 39.7).unwrap().name, "B3");
        assert!(deck.position_near(70.0, 40.0).is_none());
        assert!(deck.config().validate().is_ok());
    }

    #[test]
    fn add_remove_pick_place() {
        let mut deck = Deck::sim_default();
        let v = deck.add_vial("v1", "A1").unwrap();
        assert_eq!(v.tare_g, 10.0);
        assert_eq!(v.capacity_ul, 20_000.0);
        assert!(v.contents.is_empty());
        assert_eq!(
            deck.add_vial("v2", "A1"),
            Err(DeckError::Occupied("A1".into()))
        );
        assert_eq!(
            deck.add_vial("v1", "A2"),
            Err(DeckError::DuplicateVial("v1".into()))
        );
        assert_eq!(
            deck.add_vial("v3", "Z9"),
            Err(DeckError::UnknownPosition("Z9".into()))
        );
        assert_eq!(deck.add_vial("", "A3"), Err(DeckError::EmptyId));
        deck.pick("A1").unwrap();
        assert!(deck.vial_at("A1").is_none());
        assert_eq!(deck.held_vial().unwrap().id, "v1");
        deck.add_vial("v2", "A2").unwrap();
        assert_eq!(deck.pick("A2"), Err(DeckError::GripperFull));
        assert_eq!(deck.place("A2"), Err(DeckError::Occupied("A2".into())));
        deck.place("W1").unwrap();
        assert_eq!(deck.vial_at("W1").unwrap().id, "v1");
        assert_eq!(deck.place("W1"), Err(DeckError::GripperEmpty));
        let removed = deck.remove_vial("v1").unwrap();
        assert_eq!(removed.id, "v1");
        assert!(deck.vial_at("W1").is_none());
        assert_eq!(
            deck.remove_vial("v1"),
            Err(DeckError::NoSuchVial("v1".into()))
        );
    }

    #[test]
    fn volumes_masses_and_overflow_add_up() {
        let mut deck = Deck::sim_default();
        deck.add_vial("v", "A1").unwrap();
        let vial = &mut deck.vials_mut()[0];
        assert_eq!(vial.add_liquid(Liquid::Dye(Dye::Red), 1500.0, 22.0), 0.0);
        assert_eq!(vial.add_liquid(Liquid::Water, 500.0, 22.0), 0.0);
        assert_eq!(vial.contents.total_ul(), 2000.0);
        assert!((vial.mass_g(1.0) - 12.0).abs() < 1e-12);
        let overflow = vial.add_liquid(Liquid::Dye(Dye::Blue), 19_000.0, 22.0);
        assert!((overflow - 1000.0).abs() < 1e-9);
        assert!((vial.contents.total_ul() - 20_000.0).abs() < 1e-9);
        assert_eq!(vial.add_liquid(Liquid::Water, -5.0, 22.0), 0.0);
        assert_eq!(vial.add_liquid(Liquid::Water, f64::NAN, 22.0), 0.0);
    }

    #[test]
    fn homogeneity_drops_with_a_new_liquid_and_rises_with_mixing() {
        let mut deck = Deck::sim_default();
        deck.add_vial("v", "A1").unwrap();
        let vial = &mut deck.vials_mut()[0];
        vial.add_liquid(Liquid::Dye(Dye::Red), 500.0, 22.0);
        vial.add_liquid(Liquid::Dye(Dye::Red), 500.0, 22.0);
        assert_eq!(vial.homogeneity, 1.0, "one liquid alone is homogeneous");
        vial.add_liquid(Liquid::Dye(Dye::Blue), 1000.0, 22.0);
        assert!((vial.homogeneity - 0.5).abs() < 1e-12);
        assert!(!vial.is_mixed());
        vial.mix(3.0_f64.ln() * 10.0);
        assert!(vial.is_mixed());
        assert!(vial.homogeneity <= 1.0);
    }

    #[test]
    fn temperatures_mix_by_volume_and_relax() {
        let mut deck = Deck::sim_default();
        deck.add_vial("v", "A1").unwrap();
        let vial = &mut deck.vials_mut()[0];
        vial.add_liquid(Liquid::Water, 1000.0, 60.0);
        vial.add_liquid(Liquid::Water, 1000.0, 20.0);
        assert!((vial.temperature_c - 40.0).abs() < 1e-9);
        vial.relax_temperature(20.0, 100.0, 100.0);
        assert!((vial.temperature_c - (20.0 + 20.0 * (-1.0f64).exp())).abs() < 1e-9);
    }
}
