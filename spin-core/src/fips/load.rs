//! Loading a FiPS checkpoint whatever its rank and groups: they are read from the file (the
//! shape of `fips.bases` and the values of `fips.block_group`), not taken from a declaration, so
//! whatever `spin fips` writes can be evaluated at once.
use crate::checkpoint::{check_plan, load_tensors, lookup, read_header, read_tensors};
use crate::error::Error;
use crate::models::fips_mlps::FipsMlps;
use crate::models::vit::{Vit, VitConfig};
use crate::train::{Classifier, Runner};
use dfdx::prelude::*;
use std::path::Path;

/// The key that marks a FiPS checkpoint.
pub const BASES_KEY: &str = "fips.bases";

/// Whether the safetensors file at `path` holds a FiPS model (it has [`BASES_KEY`]).
pub fn is_fips_checkpoint(path: &Path) -> Result<bool, Error> {
    Ok(read_header(path)?.keys.contains(BASES_KEY))
}

/// A ViT of config `C` with FiPS MLPs at the rank and groups the checkpoint at `path` has,
/// loaded from it.
pub fn load<C: VitConfig>(path: &Path) -> Result<Box<dyn Classifier>, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tensors = read_tensors(path, &bytes)?;
    let (shape, _) = tensors.get(BASES_KEY).ok_or_else(|| Error::MissingKey {
        path: path.into(),
        key: BASES_KEY.into(),
        expected: vec![0, C::Dim::SIZE, 0],
    })?;
    let [groups, _, rank] = shape[..] else {
        return Err(Error::Invalid(format!(
            "{}: `{BASES_KEY}` has shape {shape:?}, expected (groups, {}, rank)",
            path.display(),
            C::Dim::SIZE
        )));
    };
    // Names the key and both shapes when the width is not the model's.
    lookup(&tensors, path, BASES_KEY, &[groups, C::Dim::SIZE, rank])?;
    let block_group = lookup(&tensors, path, "fips.block_group", &[C::DEPTH])?;
    let group_of: Vec<usize> = block_group.iter().map(|&g| g.max(0.0) as usize).collect();
    if groups == 0 || rank == 0 {
        return Err(Error::Invalid(format!(
            "{}: `{BASES_KEY}` has shape {shape:?}: no basis to load",
            path.display()
        )));
    }
    let dev = Cpu::default();
    let mlps = FipsMlps::<C, f32, Cpu>::zeros(&dev, &group_of, groups, rank);
    let mut model = Vit::<C, f32, Cpu>::build(&dev).with_mlps(mlps);
    // The plan (family, sizes, groups, rank), then every key, the masks against the values, and
    // the group indices.
    check_plan(&model, path, &bytes)?;
    load_tensors(&mut model, path, &tensors)?;
    Ok(Box::new(Runner::new(model, dev)))
}

/// Loads a FiPS checkpoint; the zoo's registry holds one per ViT member.
pub type FipsLoader = fn(&Path) -> Result<Box<dyn Classifier>, Error>;
