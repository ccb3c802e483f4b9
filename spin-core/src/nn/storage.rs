//! Storage of a block part shared across layers: a `Vec` with one entry per group when the part
//! is shared and one per layer when it is not (spin-rules' [`spin_rules::slot`] says which entry a
//! layer uses), registered with dfdx entry by entry. A shared tensor thus exists once: parameter
//! counts, memory and the optimiser see it once, and dfdx's tape sums its gradient over every
//! layer that used it.
use dfdx::nn::tensor_collection::ModuleField;
use dfdx::prelude::*;

/// Names `prefix.0 … prefix.{n-1}` for a part's storage, for [`vec_fields`].
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|j| format!("{prefix}.{j}")).collect()
}

/// Registers every entry of a part's storage with dfdx's module visitor (building, counting
/// parameters, optimiser updates, device and dtype conversion all go through it).
pub fn vec_fields<'a, M, P, E, D>(
    names: &'a [String],
    get: fn(&M) -> &Vec<P>,
    get_mut: fn(&mut M) -> &mut Vec<P>,
) -> Vec<ModuleField<'a, impl FnMut(&M) -> &P, impl FnMut(&mut M) -> &mut P, M, P>>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D>,
    P: TensorCollection<E, D>,
{
    (0..names.len())
        .map(|j| {
            M::module(
                &names[j],
                move |s: &M| &get(s)[j],
                move |s: &mut M| &mut get_mut(s)[j],
            )
        })
        .collect()
}
