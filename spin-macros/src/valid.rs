//! Checking parsed arguments. Every error points at the argument at fault and says what would be
//! valid; all errors of a declaration are reported together.
use crate::ast::{Arg, FamilyArgs, FamilyKind, FipsArgs, PatternArg, SharedArgs};
use proc_macro2::Span;

/// A checked model declaration: every number the expansion needs.
#[derive(Clone, Debug)]
pub struct Model {
    pub kind: FamilyKind,
    pub name: String,
    pub dim: usize,
    pub patch: usize,
    pub image: usize,
    pub grid: usize,
    pub classes: usize,
    pub kernel: usize,
    pub act: &'static str,
    pub variant: &'static str,
    pub heads: usize,
    pub hidden: usize,
    pub sharing: Sharing,
}

/// A checked sharing configuration.
#[derive(Clone, Debug)]
pub struct Sharing {
    pub depth: usize,
    pub groups: usize,
    pub pattern: PatternArg,
    /// The spin-core enum variant, e.g. `Pointwise` or `AttnMlp`.
    pub share: &'static str,
}

impl PatternArg {
    pub fn name(&self) -> String {
        match self {
            PatternArg::Sequential => "sequential".into(),
            PatternArg::Strided => "strided".into(),
            PatternArg::CycleRev => "cycle_rev".into(),
            PatternArg::Random(seed) => format!("random{seed}"),
            PatternArg::List(_) => "list".into(),
        }
    }
}

#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, span: Span, msg: impl std::fmt::Display) {
        let e = syn::Error::new(span, msg);
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    fn finish<T>(self, value: impl FnOnce() -> T) -> syn::Result<T> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(value()),
        }
    }
}

fn required(errs: &mut Errors, arg: &Option<Arg<usize>>, name: &str, attr: &str, example: &str) -> usize {
    match arg {
        Some(a) if a.value == 0 => {
            errs.push(a.span, format!("`{name}` must be at least 1"));
            1
        }
        Some(a) => a.value,
        None => {
            errs.push(
                Span::call_site(),
                format!("missing argument `{name}` in #[{attr}(...)], e.g. `{name} = {example}`"),
            );
            1
        }
    }
}

fn choice(
    errs: &mut Errors,
    arg: &Option<Arg<String>>,
    name: &str,
    options: &[(&str, &'static str)],
) -> &'static str {
    let Some(a) = arg else { return options[0].1 };
    match options.iter().find(|(k, _)| *k == a.value) {
        Some((_, v)) => v,
        None => {
            let valid: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
            errs.push(
                a.span,
                format!(
                    "unknown {name} `{}`; valid values are: {}",
                    a.value,
                    valid.join(", ")
                ),
            );
            options[0].1
        }
    }
}

pub fn model(f: &FamilyArgs, shared: Option<&SharedArgs>, ident: &syn::Ident) -> syn::Result<Model> {
    let mut errs = Errors::default();
    let attr = f.kind.attr();
    let dim = required(&mut errs, &f.dim, "dim", attr, "256");
    let patch = required(&mut errs, &f.patch, "patch", attr, "16");
    let image = required(&mut errs, &f.image, "image", attr, "224");
    let classes = required(&mut errs, &f.classes, "classes", attr, "1000");
    if let (Some(p), Some(i)) = (&f.patch, &f.image) {
        if p.value > 0 && i.value % p.value != 0 {
            let divisors: Vec<String> = (1..=i.value)
                .filter(|d| i.value % d == 0)
                .map(|d| d.to_string())
                .collect();
            errs.push(
                p.span,
                format!(
                    "image ({}) is not divisible by patch ({}): patches must tile the image; valid patch sizes: {}",
                    i.value,
                    p.value,
                    divisors.join(", ")
                ),
            );
        }
    }
    let (mut kernel, mut heads, mut hidden) = (0, 0, 0);
    let (mut act, mut variant) = ("Gelu", "Timm");
    match f.kind {
        FamilyKind::ConvMixer => {
            kernel = required(&mut errs, &f.kernel, "kernel", attr, "9");
            if let Some(k) = &f.kernel {
                if k.value % 2 == 0 {
                    errs.push(
                        k.span,
                        format!(
                            "kernel must be odd for 'same' padding, got {}; use {} or {}",
                            k.value,
                            k.value - 1,
                            k.value + 1
                        ),
                    );
                }
            }
            act = choice(&mut errs, &f.act, "act", &[("gelu", "Gelu"), ("relu", "Relu")]);
            variant = choice(
                &mut errs,
                &f.variant,
                "variant",
                &[("timm", "Timm"), ("spin", "Spin")],
            );
        }
        FamilyKind::Vit => {
            heads = required(&mut errs, &f.heads, "heads", attr, "6");
            if let (Some(h), Some(d)) = (&f.heads, &f.dim) {
                if h.value > 0 && d.value % h.value != 0 {
                    let valid: Vec<String> = (1..=d.value.min(64))
                        .filter(|x| d.value % x == 0)
                        .map(|x| x.to_string())
                        .collect();
                    errs.push(
                        h.span,
                        format!(
                            "dim ({}) is not divisible by heads ({}); valid head counts: {}",
                            d.value,
                            h.value,
                            valid.join(", ")
                        ),
                    );
                }
            }
            let ratio = f.mlp_ratio.as_ref().map(|r| r.value).unwrap_or(4.0);
            let h = dim as f64 * ratio;
            if h.fract() != 0.0 || h < 1.0 {
                let span = f
                    .mlp_ratio
                    .as_ref()
                    .map(|r| r.span)
                    .unwrap_or_else(Span::call_site);
                errs.push(
                    span,
                    format!("mlp_ratio × dim = {h} must be a positive whole number"),
                );
            }
            hidden = h as usize;
        }
    }
    let sharing = sharing(&mut errs, f, shared);
    let name = f
        .name
        .as_ref()
        .map(|n| n.value.clone())
        .unwrap_or_else(|| ident.to_string());
    errs.finish(|| Model {
        kind: f.kind,
        name,
        dim,
        patch,
        image,
        grid: image / patch.max(1),
        classes,
        kernel,
        act,
        variant,
        heads,
        hidden,
        sharing: sharing.unwrap_or(Sharing {
            depth: 1,
            groups: 1,
            pattern: PatternArg::Sequential,
            share: "",
        }),
    })
}

fn sharing(errs: &mut Errors, f: &FamilyArgs, s: Option<&SharedArgs>) -> Option<Sharing> {
    let Some(s) = s else {
        let depth = required(errs, &f.depth, "depth", f.kind.attr(), "8");
        let share = match f.kind {
            FamilyKind::ConvMixer => "Pointwise",
            FamilyKind::Vit => "AttnMlp",
        };
        return Some(Sharing {
            depth,
            groups: depth,
            pattern: PatternArg::Sequential,
            share,
        });
    };
    if let (Some(fd), Some(sd)) = (&f.depth, &s.depth) {
        errs.push(
            sd.span,
            "depth is given twice: keep it in #[shared_blocks] and remove it from the family attribute",
        );
        let _ = fd;
    }
    let depth_arg = s.depth.clone().or_else(|| f.depth.clone());
    let share = match f.kind {
        FamilyKind::ConvMixer => choice(
            errs,
            &s.share,
            "ConvMixer share",
            &[
                ("pointwise", "Pointwise"),
                ("depthwise", "Depthwise"),
                ("both", "Both"),
                ("block", "Block"),
            ],
        ),
        FamilyKind::Vit => choice(
            errs,
            &s.share,
            "ViT share",
            &[
                ("attn_mlp", "AttnMlp"),
                ("attn", "Attn"),
                ("mlp", "Mlp"),
                ("all", "All"),
            ],
        ),
    };
    let (depth, groups, pattern) = schedule(errs, s, &depth_arg)?;
    Some(Sharing {
        depth,
        groups,
        pattern,
        share,
    })
}

/// Checks depth, groups and pattern of a `#[shared_blocks]`.
pub fn schedule(
    errs: &mut Errors,
    s: &SharedArgs,
    depth: &Option<Arg<usize>>,
) -> Option<(usize, usize, PatternArg)> {
    let depth_v = required_at(errs, depth, "depth", s.span)?;
    let groups_v = required_at(errs, &s.groups, "groups", s.span)?;
    let groups = s.groups.as_ref()?;
    if groups_v > depth_v {
        errs.push(
            groups.span,
            format!("groups ({groups_v}) must be at most depth ({depth_v})"),
        );
        return None;
    }
    let pattern = s
        .pattern
        .as_ref()
        .map(|p| p.value.clone())
        .unwrap_or(PatternArg::Sequential);
    let pspan = s.pattern.as_ref().map(|p| p.span).unwrap_or(groups.span);
    match &pattern {
        PatternArg::Sequential | PatternArg::Random(_) if depth_v % groups_v != 0 => {
            let valid: Vec<String> = (1..=depth_v)
                .filter(|g| depth_v % g == 0)
                .map(|g| g.to_string())
                .collect();
            errs.push(
                groups.span,
                format!(
                    "pattern `{}` needs depth ({depth_v}) to be a multiple of groups ({groups_v}); \
                     valid group counts: {}, or use pattern = strided or cycle_rev",
                    pattern.name(),
                    valid.join(", ")
                ),
            );
        }
        PatternArg::List(list) => {
            if list.len() != depth_v {
                errs.push(
                    pspan,
                    format!(
                        "the pattern list has {} entries but depth is {depth_v}: give one group per layer",
                        list.len()
                    ),
                );
            } else if let Some((layer, g)) = list.iter().enumerate().find(|(_, &g)| g >= groups_v) {
                errs.push(pspan, format!("layer {layer} uses group {g}, but groups = {groups_v}: entries must be in 0..{groups_v}"));
            } else {
                let unused: Vec<String> = (0..groups_v)
                    .filter(|g| !list.contains(g))
                    .map(|g| g.to_string())
                    .collect();
                if !unused.is_empty() {
                    errs.push(
                        pspan,
                        format!(
                            "group(s) {} are used by no layer; every group must appear in the list",
                            unused.join(", ")
                        ),
                    );
                }
            }
        }
        _ => {}
    }
    Some((depth_v, groups_v, pattern))
}

fn required_at(errs: &mut Errors, arg: &Option<Arg<usize>>, name: &str, span: Span) -> Option<usize> {
    match arg {
        None => {
            errs.push(
                span,
                format!("missing argument `{name}` in #[shared_blocks(...)], e.g. `{name} = 4`"),
            );
            None
        }
        Some(a) if a.value == 0 => {
            errs.push(a.span, format!("`{name}` must be at least 1"));
            None
        }
        Some(a) => Some(a.value),
    }
}

/// Checks a stand-alone `#[shared_blocks]` over a user block.
pub fn trunk(s: &SharedArgs) -> syn::Result<(usize, usize, PatternArg)> {
    let mut errs = Errors::default();
    if let Some(share) = &s.share {
        errs.push(
            share.span,
            "`share` applies to #[convmixer] and #[vit] models; a trunk of user blocks shares whole blocks",
        );
    }
    let out = schedule(&mut errs, s, &s.depth);
    errs.finish(|| out.unwrap())
}

/// A checked `#[fips(...)]`.
#[derive(Clone, Debug)]
pub struct Fips {
    pub groups: Vec<Vec<usize>>,
    pub budget: f64,
    pub sparsity: f64,
}

/// Checks a `#[fips(...)]` against the model it compresses: a ViT without SPIN sharing, groups
/// that cover every block once with one size, a budget in (0, 1], a sparsity in [0, 1), and a
/// non-zero rank.
pub fn fips(a: &FipsArgs, m: &Model) -> syn::Result<Fips> {
    let mut errs = Errors::default();
    if m.kind != FamilyKind::Vit {
        errs.push(a.span, "#[fips] compresses a ViT's MLPs: use it with #[vit(...)]");
    }
    if m.sharing.groups != m.sharing.depth {
        errs.push(
            a.span,
            "#[fips] starts from a ViT whose blocks share nothing: remove #[shared_blocks] (FiPS shares its own bases)",
        );
    }
    let depth = m.sharing.depth;
    let groups = match &a.groups {
        None => {
            errs.push(
                a.span,
                "missing argument `groups` in #[fips(...)], e.g. `groups = [[0, 1], [2, 3]]`",
            );
            vec![]
        }
        Some(g) => {
            let mut seen = vec![false; depth];
            for &b in g.value.iter().flatten() {
                if b >= depth {
                    errs.push(
                        g.span,
                        format!("block {b} does not exist: the model has blocks 0..{depth}"),
                    );
                } else if std::mem::replace(&mut seen[b], true) {
                    errs.push(g.span, format!("block {b} is in two groups"));
                }
            }
            let missing: Vec<String> = (0..depth).filter(|&b| !seen[b]).map(|b| b.to_string()).collect();
            if !missing.is_empty() {
                errs.push(
                    g.span,
                    format!("every block must be in a group; missing: {}", missing.join(", ")),
                );
            }
            let n = g.value.first().map_or(0, Vec::len);
            if g.value.iter().any(|x| x.len() != n) {
                errs.push(
                    g.span,
                    "groups must all have the same number of blocks (the rank follows from it)",
                );
            }
            g.value.clone()
        }
    };
    let budget = match &a.budget {
        Some(b) if !(b.value > 0.0 && b.value <= 1.0) => {
            errs.push(
                b.span,
                format!(
                    "budget is the fraction of MLP weights kept: it must lie in (0, 1], got {}",
                    b.value
                ),
            );
            0.5
        }
        Some(b) => b.value,
        None => {
            errs.push(
                a.span,
                "missing argument `budget` in #[fips(...)], e.g. `budget = 0.5`",
            );
            0.5
        }
    };
    let sparsity = match &a.sparsity {
        Some(s) if !(0.0..1.0).contains(&s.value) => {
            errs.push(s.span, format!("sparsity must lie in [0, 1), got {}", s.value));
            0.0
        }
        Some(s) => s.value,
        None => 0.0,
    };
    // spin_core::fips::rank's formula, evaluated here only to point at the budget when it leaves
    // no rank (the expansion uses spin-core's const fn for the value).
    let (d, n) = (m.dim as f64, groups.first().map_or(1, Vec::len) as f64);
    let rank = (8.0 * n * d * d * budget / (8.0 * n * d * (1.0 - sparsity) + d)) as usize;
    if rank == 0 {
        let span = a.budget.as_ref().map_or(a.span, |b| b.span);
        errs.push(
            span,
            "this budget leaves rank 0: raise the budget or the sparsity",
        );
    }
    errs.finish(|| Fips {
        groups,
        budget,
        sparsity,
    })
}
