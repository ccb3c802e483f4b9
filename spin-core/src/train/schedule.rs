//! The learning-rate schedules: SPIN's one-cycle, cosine or constant, after a linear warm-up.
use crate::error::Error;

/// SPIN's "one-cycle" learning rate: piecewise linear through (0, 0), (0.4T, lr), (0.8T, lr/20),
/// (T, 0) over T steps.
#[derive(Clone, Copy, Debug)]
pub struct OneCycle {
    /// The peak learning rate.
    pub lr: f32,
    /// Steps of the whole schedule.
    pub total_steps: usize,
}

impl OneCycle {
    /// The learning rate at `step`.
    pub fn at(&self, step: usize) -> f32 {
        let t = self.total_steps.max(1) as f32;
        let s = step as f32;
        let pts = [
            (0.0, 0.0),
            (0.4 * t, self.lr),
            (0.8 * t, self.lr / 20.0),
            (t, 0.0),
        ];
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if s <= x1 {
                return y0 + (y1 - y0) * (s - x0) / (x1 - x0).max(1e-12);
            }
        }
        0.0
    }
}

/// The learning-rate curve after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// SPIN's piecewise-linear one-cycle ([`OneCycle`]); it ramps up by itself.
    #[default]
    OneCycle,
    /// Half a cosine from the peak down to zero.
    Cosine,
    /// The peak throughout.
    Constant,
}

impl Schedule {
    /// The names the command line takes.
    pub const NAMES: [&'static str; 3] = ["onecycle", "cosine", "constant"];
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "onecycle" => Ok(Self::OneCycle),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            _ => Err(Error::Invalid(format!(
                "unknown schedule `{s}`: use {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::NAMES[*self as usize])
    }
}

/// A learning rate per step: a linear warm-up from lr / `warmup_steps` to `lr`, then `kind` over
/// the remaining steps.
#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    /// The curve after warm-up.
    pub kind: Schedule,
    /// The peak learning rate.
    pub lr: f32,
    /// Steps of linear warm-up (0: none).
    pub warmup_steps: usize,
    /// Steps of the whole schedule, warm-up included.
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate at `step` (0-based).
    pub fn at(&self, step: usize) -> f32 {
        let w = self.warmup_steps.min(self.total_steps);
        if step < w {
            return self.lr * (step + 1) as f32 / w as f32;
        }
        let rest = (self.total_steps - w).max(1);
        let s = step - w;
        match self.kind {
            Schedule::OneCycle => OneCycle {
                lr: self.lr,
                total_steps: rest,
            }
            .at(s),
            Schedule::Cosine => {
                let t = (s as f32 / rest as f32).min(1.0);
                0.5 * self.lr * (1.0 + (std::f32::consts::PI * t).cos())
            }
            Schedule::Constant => self.lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_passes_through_its_points() {
        let s = OneCycle {
            lr: 1.0,
            total_steps: 100,
        };
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(40) - 1.0).abs() < 1e-6);
        assert!((s.at(20) - 0.5).abs() < 1e-6);
        assert!((s.at(80) - 0.05).abs() < 1e-6);
        assert!(s.at(100).abs() < 1e-6);
    }

    #[test]
    fn schedules_warm_up_then_follow_their_curve() {
        let at = |kind, warmup_steps| LrSchedule {
            kind,
            lr: 1.0,
            warmup_steps,
            total_steps: 110,
        };
        // Without warm-up, one-cycle is SPIN's curve over all steps.
        let one = OneCycle {
            lr: 1.0,
            total_steps: 110,
        };
        assert!((0..=110).all(|s| at(Schedule::OneCycle, 0).at(s) == one.at(s)));
        let cos = at(Schedule::Cosine, 10);
        assert!((cos.at(0) - 0.1).abs() < 1e-6 && (cos.at(9) - 1.0).abs() < 1e-6);
        assert!((cos.at(10) - 1.0).abs() < 1e-6 && (cos.at(60) - 0.5).abs() < 1e-6);
        assert!(cos.at(110).abs() < 1e-6);
        assert!((0..110).all(|s| at(Schedule::Constant, 0).at(s) == 1.0));
        assert_eq!("cosine".parse::<Schedule>().unwrap().to_string(), "cosine");
        assert!("linear".parse::<Schedule>().is_err());
    }
}
