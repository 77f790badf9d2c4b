"""Permutation specs derived from a traced graph, for any `nn.Module` / `PreTrainedModel`.

    from hf_permerge.alignment.tracing import trace_permutation_spec
    spec = trace_permutation_spec(model)     # for our classes: spec.equivalent(model.permutation_spec())
    spec = trace_permutation_spec(vit)       # heads: units permuted within each head

How. The model is traced with `torch.export` (non-strict), which gives a `torch.fx` graph of aten ops
in which every parameter and buffer is a placeholder named by its state-dict key and every op carries
the module path it ran in. (`torch.fx.symbolic_trace` cannot follow transformers' models: their
forwards branch on tensor shapes, e.g. ViT's patch embedding checks the channel count; export traces
with concrete shapes, so Python control flow simply runs.) Then each tensor axis of each graph value
gets a label, and labels are merged with union-find:

- the output axis of every Linear / Conv weight starts a candidate group (an *origin*); its weight's
  input axis is tied to the label of the layer input's feature / channel axis;
- pointwise ops (activations, dropout, additions, multiplications) tie the labels of broadcast axes:
  a residual addition ties its two streams into one group, a parameter added to a stream (ViT's
  position embedding, class token) joins the stream's group;
- BatchNorm / LayerNorm (and GroupNorm with 1 or C groups) parameters and running statistics follow
  their channel's label; pooling, spatial reductions, padding and cyclic shifts of positions (Swin's
  shifted windows) and reshapes that do not touch a labelled axis pass labels through (flattening
  (N, C, 1, 1) to (N, C) keeps C);
- the model's inputs and outputs are pinned: a label tied to them is never permuted (the classifier's
  output, the input pixels);
- a matrix product (and `scaled_dot_product_attention`) ties the axes it contracts: the query and key
  projections' units become one group, the value projection's units (with the output projection's
  inputs) another;
- attention heads: a reshape that splits a group's axis into (heads, units per head) pins the heads
  axis and keeps the group on the units; the reshape that merges them back restores it. Such a group
  gets `PermGroup.blocks` = heads: its permutations keep each head's units together (each head its
  own permutation). An attention op couples its query/key group with its value group
  (`PermutationSpec.couplings`): whole heads move, alike in both; every matcher respects this
  (`hungarian.solve_coupled`), unless the op's mask differs between heads (Swin's relative position
  bias). If moving heads breaks the invariance check (a per-head bias elsewhere, say), the couplings
  are dropped and heads stay in place;
- an order fixed within each head (rotary embeddings: slices, concatenation and the cos/sin of
  frequencies outside the state dict, all seeing at most one head's units) keeps the units in order
  inside their heads but lets whole heads move: the group becomes `PermGroup.rigid`, coupled as above.
  A tensor outside the state dict fixes the order of the units it meets instead of joining their
  group (rotary frequencies, shared by every layer, would tie all layers' heads into one group).
  Grouped-query attention (kv key/value heads, each serving heads / kv consecutive query heads) is
  regrouped by width: the queries with the output projection's inputs, the keys with the values, both
  rigid in kv blocks and coupled, so a key/value head moves with its query heads;
- a grouped convolution (1 < groups < channels; RegNet, ResNeXt): its output channels get
  `PermGroup.blocks` = groups (permuted within each conv group, groups stay in place); its input
  channels keep their order (a keep): moving them within a group would need that group's own
  permutation on just its weight rows, which no axis permutation expresses;
- anything else that touches a candidate group's axis (a reshape that merges it with spatial
  positions or splits it otherwise, a concatenation along it, an index into it, an op this tracer
  does not know) makes
  the group unfollowable: `on_unsupported="error"` (default) raises a ValueError naming the op, its
  node and its module; `"skip"` leaves that group unpermuted and records why in `TracedSpec.skipped`.

Every unpinned, followable origin class becomes a `PermGroup`, named after its first origin module
(state-dict key of the weight without ".weight"). `preactivation`: for a group produced by one layer,
that layer, or the norm that directly follows it (Conv -> BatchNorm: the BatchNorm), as in the
hand-written specs. `activation`: the nonlinearity module applied right after that; for a group tied
by residual additions (several producing layers), no single module carries its pre-activations
(preactivation None) and `activation` is the last nonlinearity module (else the last norm module)
whose output carries the group: the stream's final value (ViT: the final LayerNorm). A module called
more than once (a shared `nn.ReLU`) is never named, since its hook would see several tensors. A name
is None where no module exists (a functional `F.relu`).

The unit axis of a named module's output is 1 for convs and BatchNorm, and the last axis for Linear
and LayerNorm: for a ViT's (N, tokens, units) activations that is not axis 1; `TracedSpec.unit_axes`
records it per group.

`check_permutation_invariance` applies random permutations and checks the model computes the same
function; `trace_permutation_spec` runs it by default, and names the group that breaks it.
"""

from .build import TracedSpec, attach_permutation_spec, trace, trace_permutation_spec
from .export import example_inputs_for, example_tokens
from .invariance import InvarianceError, check_permutation_invariance

__all__ = [
    "TracedSpec",
    "trace",
    "trace_permutation_spec",
    "check_permutation_invariance",
    "InvarianceError",
    "attach_permutation_spec",
    "example_inputs_for",
    "example_tokens",
]
