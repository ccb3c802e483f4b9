//! The sharing engine. A block is made of parts (ConvMixer: depthwise conv, BN, pointwise conv, BN;
//! ViT: norm1, attention, norm2, MLP). Each part is stored in a `Vec`: one entry per group when
//! the part is shared, one per layer when it is not. Layer i uses entry [`slot`]`(shared, schedule,
//! i)`, so a shared tensor exists once: parameter counts, memory and the optimiser see it once, and
//! dfdx's tape sums its gradient over every layer that used it.
use dfdx::nn::tensor_collection::ModuleField;
use dfdx::prelude::*;

/// Which entry of a part's storage layer `i` uses.
#[inline]
pub fn slot(shared: bool, schedule: &[usize], i: usize) -> usize {
    if shared {
        schedule[i]
    } else {
        i
    }
}

/// How many entries a part's storage holds.
pub const fn count(shared: bool, depth: usize, groups: usize) -> usize {
    if shared {
        groups
    } else {
        depth
    }
}

/// The layers that use entry `j` of a part's storage.
pub fn users(shared: bool, schedule: &[usize], j: usize) -> Vec<usize> {
    if shared {
        (0..schedule.len()).filter(|&i| schedule[i] == j).collect()
    } else {
        vec![j]
    }
}

/// What a ConvMixer shares across the layers of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvMixerShare {
    /// The pointwise 1×1 conv (weight and bias): SPIN's choice.
    Pointwise,
    /// The depthwise conv.
    Depthwise,
    /// Both convolutions; BatchNorms stay per layer.
    Both,
    /// The whole block, BatchNorms included.
    Block,
}

impl ConvMixerShare {
    pub const fn depthwise(self) -> bool {
        matches!(self, Self::Depthwise | Self::Both | Self::Block)
    }
    pub const fn pointwise(self) -> bool {
        matches!(self, Self::Pointwise | Self::Both | Self::Block)
    }
    pub const fn norms(self) -> bool {
        matches!(self, Self::Block)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Pointwise => "pointwise",
            Self::Depthwise => "depthwise",
            Self::Both => "both",
            Self::Block => "block",
        }
    }
}

/// What a ViT shares across the layers of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VitShare {
    /// qkv and proj.
    Attn,
    /// fc1 and fc2.
    Mlp,
    /// Attention and MLP, LayerNorms per layer: SPIN's choice.
    AttnMlp,
    /// Everything including the LayerNorms (ALBERT).
    All,
}

impl VitShare {
    pub const fn attn(self) -> bool {
        matches!(self, Self::Attn | Self::AttnMlp | Self::All)
    }
    pub const fn mlp(self) -> bool {
        matches!(self, Self::Mlp | Self::AttnMlp | Self::All)
    }
    pub const fn norms(self) -> bool {
        matches!(self, Self::All)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Attn => "attn",
            Self::Mlp => "mlp",
            Self::AttnMlp => "attn_mlp",
            Self::All => "all",
        }
    }
}

/// Names `prefix.0 … prefix.{n-1}` for a part's storage, for [`vec_fields`].
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|j| format!("{prefix}.{j}")).collect()
}

/// Registers every entry of a part's storage with dfdx's module visitor (building, counting
/// parameters, optimiser updates, device and dtype conversion all go through it).
#[allow(clippy::type_complexity)]
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

/// A stand-alone `#[shared_blocks]` declaration over a user block type.
pub trait StackConfig: 'static + Clone + Copy + std::fmt::Debug + Default + Send + Sync {
    /// The block's builder type (e.g. a dfdx tuple of layers).
    type Block;
    const DEPTH: usize;
    const GROUPS: usize;
    const PATTERN: &'static str;
    const SCHEDULE: &'static [usize];
}

/// A trunk of `C::DEPTH` applications of a block whose parameters live in `C::GROUPS` copies:
/// layer i runs copy `C::SCHEDULE[i]`. Usable wherever a dfdx module is, e.g. inside a tuple.
#[derive(Debug)]
pub struct SharedStack<C: StackConfig, M> {
    pub groups: Vec<M>,
    _config: std::marker::PhantomData<C>,
}

impl<C: StackConfig, M: Clone> Clone for SharedStack<C, M> {
    fn clone(&self) -> Self {
        Self {
            groups: self.groups.clone(),
            _config: std::marker::PhantomData,
        }
    }
}

impl<C: StackConfig, E: Dtype, D: Device<E>, M: TensorCollection<E, D>> TensorCollection<E, D>
    for SharedStack<C, M>
{
    type To<E2: Dtype, D2: Device<E2>> = SharedStack<C, M::To<E2, D2>>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let n = names("group", C::GROUPS);
        visitor.visit_fields(
            vec_fields::<Self, _, E, D>(&n, |s| &s.groups, |s| &mut s.groups),
            |groups| SharedStack {
                groups,
                _config: std::marker::PhantomData,
            },
        )
    }
}

impl<C: StackConfig, X, M: Module<X, Output = X>> Module<X> for SharedStack<C, M> {
    type Output = X;
    type Error = M::Error;
    fn try_forward(&self, mut x: X) -> Result<X, M::Error> {
        for &g in C::SCHEDULE {
            x = self.groups[g].try_forward(x)?;
        }
        Ok(x)
    }
}

impl<C: StackConfig, X, M: ModuleMut<X, Output = X>> ModuleMut<X> for SharedStack<C, M> {
    type Output = X;
    type Error = M::Error;
    fn try_forward_mut(&mut self, mut x: X) -> Result<X, M::Error> {
        for &g in C::SCHEDULE {
            x = self.groups[g].try_forward_mut(x)?;
        }
        Ok(x)
    }
}
