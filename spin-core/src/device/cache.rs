//! Host weights kept between inference calls (a ViT's blocks, the last few Linear layers), keyed
//! by the identity of the tensor buffers they were made from.
use super::SpinDevice;
use crate::base::SpinDtype;
use crate::kernels::blocks::HostLinear;
#[cfg(doc)]
use crate::kernels::blocks::VitBlockHost;
use dfdx::nn::tensor_collection::{RecursiveWalker, TensorVisitor, ViewTensorRef};
use dfdx::prelude::*;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// A model's blocks' host weights (`T`: a ViT's [`VitBlockHost`]s, a ConvMixer's
/// [`crate::kernels::blocks::MixerTrunkHost`]), kept between inference calls: copying and
/// re-laying out the weights took a quarter of DeiT-Tiny's forward pass.
///
/// The entry is valid while every tensor of the model still uses the buffer it had when the entry
/// was made. It holds a clone of the model (shared buffers, no copy), so those buffers stay alive
/// and unchanged: dfdx writes to a shared buffer by copying it first (`Arc::make_mut`), so an
/// update moves the written tensor to a new buffer, and the next call sees a different key and
/// refills. A traced (training) forward drops the entry.
pub struct BlockCache<T, M> {
    slot: Mutex<Option<Box<CacheEntry<T, M>>>>,
}

struct CacheEntry<T, M> {
    keys: Vec<[usize; 2]>,
    _source: M,
    blocks: Arc<T>,
}

impl<T, M> Default for BlockCache<T, M> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<T, M> std::fmt::Debug for BlockCache<T, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockCache")
    }
}

impl<T, M> BlockCache<T, M> {
    /// The blocks of a model whose tensors have buffer `keys` (see [`buffer_keys`]): the cached
    /// ones while the keys match, else `make()`'s, cached with `source()` (a clone of the model).
    /// Without keys (a device without host buffers) nothing is cached.
    pub fn get(
        &self,
        keys: Option<Vec<[usize; 2]>>,
        source: impl FnOnce() -> M,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let Some(keys) = keys else {
            return Arc::new(make());
        };
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            if e.keys == keys {
                return e.blocks.clone();
            }
        }
        *slot = None; // the old weights go before the new ones are made
        let blocks = Arc::new(make());
        *slot = Some(Box::new(CacheEntry {
            keys,
            _source: source(),
            blocks: blocks.clone(),
        }));
        blocks
    }

    /// Drops the entry (training is about to change the weights).
    pub fn clear(&self) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The buffer key ([`super::InferKernels::buffer_key`]) of every tensor of `m`, in visiting
/// order; `None` if the device has none.
pub fn buffer_keys<M: TensorCollection<E, D>, E: SpinDtype, D: SpinDevice<E>>(
    m: &M,
) -> Option<Vec<[usize; 2]>> {
    let mut keys = BufferKeys::<E, D> {
        out: Some(Vec::new()),
        _d: PhantomData,
    };
    M::iter_tensors(&mut RecursiveWalker { m, f: &mut keys }).ok()?;
    keys.out
}

struct BufferKeys<E, D> {
    out: Option<Vec<[usize; 2]>>,
    _d: PhantomData<(E, D)>,
}

impl<E: SpinDtype, D: SpinDevice<E>> TensorVisitor<E, D> for BufferKeys<E, D> {
    type Viewer = ViewTensorRef;
    type Err = D::Err;
    type E2 = E;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _opts: TensorOptions<S, E, D>,
        t: &Tensor<S, E, D>,
    ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
        match (D::buffer_key(t), self.out.as_mut()) {
            (Some(k), Some(out)) => out.push(k),
            _ => self.out = None,
        }
        Ok(None)
    }
}

/// Linear layers run without a tape (a model's patch embedding and head), laid out and packed
/// once and kept for the next call: re-laying DeiT's 1000-class head and its patch embedding out
/// on every call cost more than their products at batch 1.
///
/// An entry is keyed by the weight's and bias's buffers ([`super::InferKernels::buffer_key`]) and
/// shape, and holds clones of both tensors, so for the reason given at [`BlockCache`] its key
/// stays valid while it lives. The oldest entry makes room for a new one; until then an entry
/// keeps its tensors alive after their model is dropped (for ViT-Base's stem and head, about
/// 11 MB with the packed copies).
pub(crate) struct KeptLinears {
    entries: Mutex<Vec<KeptLinear>>,
}

struct KeptLinear {
    key: [[usize; 2]; 3],
    /// The weight and bias tensors the entry was made from.
    _sources: Box<dyn std::any::Any + Send>,
    layer: Arc<dyn std::any::Any + Send + Sync>,
}

/// How many layers [`KeptLinears`] keeps: a few models' stems and heads.
const KEPT_LINEARS: usize = 8;

impl KeptLinears {
    pub(crate) const fn new() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The layer made from `w` and `b` by `make`: the kept one while their buffers are the same.
    pub(crate) fn get<E: SpinDtype, D: super::InferKernels<E>>(
        &self,
        w: &Tensor<(usize, usize), E, D>,
        b: &Tensor<(usize,), E, D>,
        make: impl FnOnce() -> HostLinear<E>,
    ) -> Arc<HostLinear<E>>
    where
        Tensor<(usize, usize), E, D>: Send,
        Tensor<(usize,), E, D>: Send,
    {
        let (Some(wk), Some(bk)) = (D::buffer_key(w), D::buffer_key(b)) else {
            return Arc::new(make());
        };
        let (rows, cols) = *w.shape();
        let key = [wk, bk, [rows, cols]];
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = entries.iter().position(|e| e.key == key) {
            if let Ok(layer) = entries[i].layer.clone().downcast::<HostLinear<E>>() {
                let hit = entries.remove(i);
                entries.push(hit); // most recently used last
                return layer;
            }
            entries.remove(i);
        }
        let layer = Arc::new(make());
        if entries.len() == KEPT_LINEARS {
            entries.remove(0);
        }
        entries.push(KeptLinear {
            key,
            _sources: Box::new((w.clone(), b.clone())),
            layer: layer.clone(),
        });
        layer
    }
}
