//! A training run's resumable state is one unit: a run that dies after committing an epoch's state
//! but before writing that epoch's checkpoint and metrics (the observer's error stops it exactly
//! there, as a kill would) resumes cleanly and ends bit for bit where an uninterrupted run ends.
use spin_core::data::{self, DataConfig, DataSpec, Dataset};
use spin_core::train::{self, Event, RunOptions, RunState, TrainConfig};
use spin_core::Error;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spin-run-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small_digits() -> (Dataset, Dataset) {
    let split = data::load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
    let idx: Vec<usize> = (0..96).collect();
    let pick = |d: &Dataset, n: usize| d.subset(&idx[..n]);
    (pick(&split.train, 96), pick(&split.test, 48))
}

const MEMBER: &str = "digits_convmixer_64_8_ws4_strided";

fn config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch: 32,
        ..TrainConfig::default()
    }
}

fn options(dir: &Path, resume: bool) -> RunOptions {
    RunOptions {
        resume,
        eval_batch: 64,
        ..RunOptions::new(dir)
    }
}

/// Runs the member; `die_at` makes the observer fail right after that epoch's state is committed.
fn train(dir: &Path, resume: bool, die_at: Option<usize>) -> Result<(), Error> {
    let (tr, te) = small_digits();
    let mut model = zoo::build(MEMBER, 0).unwrap();
    train::run(
        model.as_mut(),
        &tr,
        &te,
        &config(),
        &options(dir, resume),
        &mut |e| match e {
            Event::Committed { epochs_done } if Some(epochs_done) == die_at => Err(Error::Invalid(
                "killed between the state and the checkpoint".into(),
            )),
            _ => Ok(()),
        },
    )
    .map(|_| ())
}

#[test]
fn a_run_killed_between_state_and_checkpoint_resumes_bit_for_bit() {
    let whole = scratch("whole");
    train(&whole, false, None).unwrap();

    let broken = scratch("broken");
    let err = train(&broken, false, Some(2)).unwrap_err().to_string();
    assert!(err.contains("killed"), "{err}");
    // The state says two epochs; the checkpoint and the metrics are still epoch 1's.
    assert_eq!(RunState::load(&broken).unwrap().epochs_done, 2);
    let rows = |d: &Path| std::fs::read_to_string(d.join("metrics.csv")).unwrap();
    assert_eq!(rows(&broken).lines().count(), 2, "{}", rows(&broken));
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert!(read(&broken, "checkpoint.safetensors") != read(&whole, "checkpoint.safetensors"));

    train(&broken, true, None).unwrap();
    assert!(
        read(&broken, "checkpoint.safetensors") == read(&whole, "checkpoint.safetensors"),
        "the resumed run's weights differ from the uninterrupted run's"
    );
    let (a, b) = (RunState::load(&whole).unwrap(), RunState::load(&broken).unwrap());
    assert_eq!(a.epochs_done, 3);
    assert!(a.optimizer == b.optimizer, "optimiser state differs");
    assert!(a.tensors == b.tensors, "model state differs");
    // Metrics: three rows, equal but for the seconds and images/s columns.
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(strip(rows(&whole)), strip(rows(&broken)));
    // best.safetensors is the last epoch's model exactly when the last epoch beat the others.
    let accs: Vec<f32> = rows(&whole)
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse().unwrap())
        .collect();
    let last_is_best = accs[2] > accs[0].max(accs[1]);
    let same = read(&whole, "best.safetensors") == read(&whole, "checkpoint.safetensors");
    assert_eq!(same, last_is_best, "accuracies {accs:?}");
    assert_eq!(rows(&broken).lines().count(), 4);

    // A finished run resumed again trains nothing and changes nothing.
    let before = read(&broken, "state.safetensors");
    train(&broken, true, None).unwrap();
    assert!(before == read(&broken, "state.safetensors"));
    // Resuming with other settings is refused, naming the setting, unless overridden.
    let (tr, te) = small_digits();
    let mut model = zoo::build(MEMBER, 0).unwrap();
    let other = TrainConfig {
        lr: 0.5,
        epochs: 4,
        ..config()
    };
    let err = train::run(
        model.as_mut(),
        &tr,
        &te,
        &other,
        &options(&broken, true),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("started with --epochs 3, not 4"), "{err}");
    let overridden = RunOptions {
        override_settings: true,
        ..options(&broken, true)
    };
    let r = train::run(model.as_mut(), &tr, &te, &other, &overridden, &mut |_| Ok(())).unwrap();
    assert_eq!(r.epochs_run, 1);
    // Another member cannot resume this run.
    let (tr, te) = small_digits();
    let mut other = zoo::build("digits_convmixer_64_8", 0).unwrap();
    let err = train::run(
        other.as_mut(),
        &tr,
        &te,
        &config(),
        &options(&broken, true),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("trains digits_convmixer_64_8_ws4_strided"), "{err}");
    // Nor start over in its directory without --override.
    let fresh = RunOptions::new(&broken);
    let err = train::run(other.as_mut(), &tr, &te, &config(), &fresh, &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("choose another directory"), "{err}");
    for d in [whole, broken] {
        let _ = std::fs::remove_dir_all(d);
    }
}
