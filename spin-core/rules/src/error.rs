//! What a broken rule reports: the argument at fault and why.

/// The declaration argument a [`RuleError`] is about, so the macro can point at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The number of layers.
    Depth,
    /// The number of parameter groups.
    Groups,
    /// The sharing pattern (a name or an explicit list).
    Pattern,
    /// FiPS's groups of blocks.
    FipsGroups,
    /// FiPS's parameter budget.
    Budget,
    /// FiPS's sparsity of the factors.
    Sparsity,
}

/// A rule a model declaration or plan breaks, with a message that says what would be valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// The argument at fault.
    pub field: Field,
    /// One line: what is wrong and what would be valid.
    pub message: String,
}

impl RuleError {
    pub(crate) fn new(field: Field, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RuleError {}
