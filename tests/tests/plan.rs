//! Every checkpoint carries its member's plan, and a checkpoint whose plan does not fit the model
//! it is loaded into is refused naming the field — even when every tensor shape would fit.
use spin_core::models::{Plan, PLAN_KEY};
use spin_core::prelude::*;

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("spin-plan-{name}-{}.safetensors", std::process::id()))
}

#[test]
fn plans_round_trip_and_travel_in_checkpoints() {
    for m in zoo::MEMBERS {
        let plan = Plan::from_info(&(m.info)());
        assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), plan, "{}", plan.name);
        assert_eq!(plan.schedule.len(), plan.depth);
    }
    let path = scratch("travel");
    let model = zoo::build("digits_vit_64_6_ws2_sequential", 0).unwrap();
    model.save_timm(&path, Default::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let plan = Plan::from_json(&header.metadata().as_ref().unwrap()[PLAN_KEY]).unwrap();
    assert_eq!(plan.name, "digits_vit_64_6_ws2_sequential");
    assert_eq!(plan.schedule, [0, 0, 1, 1, 2, 2]);
    assert_eq!(plan.params, model.info().params);
    // The header alone names the member (what `spin eval` without --model reads).
    assert_eq!(
        zoo::member_name(None, &path).unwrap(),
        "digits_vit_64_6_ws2_sequential"
    );
    assert!(!spin_core::fips::is_fips_checkpoint(&path).unwrap());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_checkpoint_of_another_schedule_is_refused_naming_the_field() {
    let path = scratch("mismatch");
    // Same tensor shapes (two pointwise convs each), different schedules.
    zoo::build("digits_convmixer_64_8_ws4_strided", 0)
        .unwrap()
        .save_timm(&path, Default::default())
        .unwrap();
    let err = zoo::load("digits_convmixer_64_8_ws4_sequential", &path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("schedule") && err.contains("digits_convmixer_64_8_ws4_strided"),
        "{err}"
    );
    // The plan is checked before any tensor: another family is named as such.
    let err = zoo::load("digits_vit_64_6", &path).err().unwrap().to_string();
    assert!(err.contains("family"), "{err}");
    // A model of the same plan loads it.
    assert!(zoo::load("digits_convmixer_64_8_ws4_strided", &path).is_ok());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_declared_model_type_checks_plans_too() {
    #[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 3)]
    #[shared_blocks(depth = 4, groups = 2, pattern = strided)]
    struct A;
    #[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 3)]
    #[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
    struct B;
    let dev = Cpu::default();
    let path = scratch("typed");
    dev.build_module::<A, f32>().save_timm(&path).unwrap();
    let err = dev
        .build_module::<B, f32>()
        .load_timm(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("schedule = [0, 1, 0, 1] (pointwise)"), "{err}");
    // Untying is fine: an unshared model of the same sizes loads the shared checkpoint.
    #[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 3, depth = 4)]
    struct Unshared;
    dev.build_module::<Unshared, f32>().load_timm(&path).unwrap();
    std::fs::remove_file(path).unwrap();
}
