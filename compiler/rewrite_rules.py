"""Runs onnxscript rewrite rules so that the nodes they add read like planer's own.

onnxscript's rewriter matches a declared pattern backwards from its last node (the
root), in every operand order of Add and Mul, and swaps the match for what the rule
builds:

    ReduceMean ─ Sub ─ … ─ Add   ─▶  pattern matched at the root Add, check(bindings)
                                 ─▶  rewrite(op, bindings) builds the replacement, which
                                     is inserted at the root; the matched nodes go (none
                                     of their inner values may be read elsewhere)

Left to itself, the rewriter names a replacement's output after the value it replaces
and merges the matched nodes' metadata (the exporter's stack traces) and a rule-name
tag into the new nodes. planer names every node and value after the node it replaces
(`<anchor>/<Op>`, `<anchor>/<Op>_out`) and stamps exactly its provenance (`planer.pass`,
`planer.block`), which `planer diff`, the finder and the goldens read. So `apply_rules`
settles every node a `PlanerRule` built once the rewriter is done: provenance back to
planer's alone, outputs renamed unless they are graph outputs (those keep their name).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchContext
from onnxscript.rewriter import pattern as rw

from planer.compiler.irutil import scalar

Check = Callable[[MatchContext, ir.Value], bool]


class Builder:
    """Builds one replacement: nodes named `<base>/<name>` with the given provenance."""

    def __init__(self, op: rw.RewriterContext, base: str, provenance: Mapping[str, str],
                 built: list[tuple[ir.Node, dict[str, str]]]):
        self._op = op
        self.base = base
        self.provenance = dict(provenance)
        self._built = built

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str,
           attributes: Mapping[str, Any] | None = None, *, domain: str = "") -> ir.Value:
        """Adds one single-output node named `<base>/<name>` and returns its output."""
        value = self._op.call_op(op_type, list(inputs), dict(attributes or {}),
                                 domain=domain, name=f"{self.base}/{name}")
        assert isinstance(value, ir.Value), f"{op_type} has one output"
        node = value.producer()
        assert node is not None
        self._built.append((node, self.provenance))
        return value

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        """Adds `array` as an initializer named `<base>/<name>`."""
        full = f"{self.base}/{name}"
        # ascontiguousarray turns 0-d arrays into [1]; keep scalars scalar.
        array = np.ascontiguousarray(array).reshape(np.shape(array))
        return self._op.initializer(ir.tensor(array, name=full), name=full)


class PlanerRule(abc.ABC):
    """A rewrite rule (pattern, check, rewrite) whose new nodes get planer's names.

    `pattern(op, *vars)` and `rewrite(op, **bindings)` follow onnxscript's conventions;
    `check(context, **bindings)` runs after the pattern matched, and `self.root` is the
    matched root node while `check` and `rewrite` run.
    """

    commute = True
    """Also match with the operands of commutative ops (Add, Mul, ...) swapped."""

    requires: frozenset[str] = frozenset()
    """Op types a graph must hold for the rule to be tried at all."""

    def __init__(self) -> None:
        self._root: ir.Node | None = None
        self._built: list[tuple[ir.Node, dict[str, str]]] = []

    @property
    def root(self) -> ir.Node:
        """The root node of the match being checked or rewritten."""
        assert self._root is not None, "root is set once a pattern matched"
        return self._root

    @abc.abstractmethod
    def pattern(self, op: Any, *args: Any) -> Any:
        """Declares the subgraph to match (onnxscript pattern builder `op`)."""

    # (*args: Any, **kwargs: Any) lets each rule name the bindings it reads.
    def check(self, *args: Any, **kwargs: Any) -> bool:
        """Tells whether a structural match may be rewritten (context, then bindings)."""
        return True

    @abc.abstractmethod
    def rewrite(self, *args: Any, **kwargs: Any) -> ir.Value:
        """Builds the replacement through `self.builder` and returns its output."""

    def builder(self, op: rw.RewriterContext, base: str,
                provenance: Mapping[str, str]) -> Builder:
        """Returns a Builder that names nodes `<base>/...` and records them for settling."""
        return Builder(op, base, provenance, self._built)

    def rules(self) -> list[rw.RewriteRule]:
        """Returns the onnxscript rules: this one, in every operand order if `commute`."""
        rule = rw.RewriteRule(self.pattern, self.rewrite, self._check,
                              matcher=_RootOpMatcher, name=type(self).__name__)
        return list(rule.commute()) if self.commute else [rule]

    def settle(self) -> None:
        """Gives the nodes built so far planer's names and provenance, and forgets them."""
        for node, provenance in self._built:
            if node.graph is None:
                continue  # built for a replacement the rewriter then dropped
            node.metadata_props.clear()
            node.metadata_props.update(provenance)
            out = node.outputs[0]
            if not out.is_graph_output():
                out.name = f"{node.name}_out"
        self._built.clear()

    def _check(self, context: MatchContext, **bindings: Any) -> bool:
        self._root = context.root
        return self.check(context, **bindings)


def apply_rules(model: ir.Model, rules: Sequence[PlanerRule]) -> int:
    """Rewrites every match of `rules` in `model` in place; returns how many were rewritten.

    Rules are tried in order at each node (graph order), the first that matches wins.
    """
    present = {node.op_type for node in model.graph}
    rules = [rule for rule in rules if rule.requires <= present]
    if not rules:
        return 0
    count = rw.RewriteRuleSet([r for rule in rules for r in rule.rules()]).apply_to_model(model)
    for rule in rules:
        rule.settle()
    return count


class _RootOpMatcher(rw.SimplePatternMatcher):
    """onnxscript's matcher, except that it turns nodes of another op type away first.

    The rewriter tries every rule (every commuted copy: 16 per erf-GELU spelling) at
    every node, and a match attempt sets up its bookkeeping before it looks at the op
    type; this check keeps that cost to the nodes that can be a pattern's root (ORT
    kernel choice on MiniLM, 2 busy cores: 0.17 s with it, 0.24 s without).
    """

    # One shared failed result: the rewriter only tests it and never changes it.
    _NO_MATCH = rw.MatchResult().fail("root op type differs")

    def __init__(self, pattern: Any) -> None:
        super().__init__(pattern)
        # The root's op and domain patterns (its op identifier is lost on commuted copies).
        root = pattern.output_nodes[0]
        self._root_op, self._root_domain = root.op, root.domain

    def match(self, model: ir.Model, graph_or_function: ir.Graph | ir.Function,
              node: ir.Node, **kwargs: Any) -> rw.MatchResult:
        if not (self._root_op.matches(node.op_type) and self._root_domain.matches(node.domain)):
            return self._NO_MATCH
        return super().match(model, graph_or_function, node, **kwargs)


def scalar_near(want: float, rtol: float = 1e-5) -> Check:
    """Returns a pattern check: the value is a one-element constant within `rtol` of `want`.

    onnxscript's own constant patterns accept 0-d tensors only; exporters also write
    these constants as [1] tensors.
    """

    def check(_context: MatchContext, value: ir.Value) -> bool:
        found = scalar(value)
        return found is not None and abs(found - want) <= rtol * abs(want)

    return check
