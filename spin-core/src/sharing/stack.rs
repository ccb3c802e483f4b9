//! A stand-alone `#[shared_blocks]` trunk over a user's block type.
use crate::nn::storage::{names, vec_fields};
use dfdx::prelude::*;

/// A stand-alone `#[shared_blocks]` declaration over a user block type.
pub trait StackConfig: 'static + Clone + Copy + std::fmt::Debug + Default + Send + Sync {
    /// The block's builder type (e.g. a dfdx tuple of layers).
    type Block;
    /// Layers.
    const DEPTH: usize;
    /// Copies of the block.
    const GROUPS: usize;
    /// The sharing pattern's name.
    const PATTERN: &'static str;
    /// The copy every layer runs.
    const SCHEDULE: &'static [usize];
}

/// A trunk of `C::DEPTH` applications of a block whose parameters live in `C::GROUPS` copies:
/// layer i runs copy `C::SCHEDULE[i]`. Usable wherever a dfdx module is, e.g. inside a tuple.
///
/// ```
/// use spin_core::prelude::*;
///
/// type Block = (Linear<8, 8>, ReLU);
/// #[shared_blocks(depth = 6, groups = 2, pattern = strided)]
/// struct Trunk(Block);
///
/// let dev = Cpu::default();
/// let trunk = dev.build_module::<Trunk, f32>();
/// assert_eq!(trunk.groups.len(), 2);
/// assert_eq!(trunk.num_trainable_params(), 2 * (8 * 8 + 8));
/// let y = trunk.forward(dev.zeros::<Rank1<8>>());
/// assert_eq!(y.shape().0.size(), 8);
/// ```
#[derive(Debug)]
pub struct SharedStack<C: StackConfig, M> {
    /// The stored copies of the block.
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
