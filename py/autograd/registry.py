"""The op registry: each differentiable op module (py/ops/<op>.py) declares OP = Op(...): its tape record (named
inputs and arguments), its recording wrapper llm_t_<op> (the forward kernel it calls) and its backward rule
(the backward kernels it calls). tape.py generates the wrappers and backward.py the dispatch of llm_backward
from the registry, so adding a differentiable op is one module (plus its kernel module and test) and the
autograd code names no op.

A tape row is (tape, seq, op, a, b, c, out, args): a, b, c are the op's tensor inputs in `inputs` order (the
backward rule names them), args a JSON object of its named arguments (`args`), e.g. {"ta": false, "tb": true}.
In a backward rule, {name} is an input's tensor id or an argument's value (typed), {g} the output's gradient;
`acc(t, grad)` adds a gradient tensor into tensor t's (llm_grad_acc), `like(t, 'name')` is an empty tensor
shaped and tiled like t for a backward kernel to write into."""
from __future__ import annotations

import importlib
import pkgutil
import re
import textwrap
from dataclasses import dataclass

TAPE_COLUMNS = ("a", "b", "c")


@dataclass(frozen=True)
class Op:
    name: str  # the tape's op name, e.g. 'matmul'
    inputs: tuple[str, ...]  # tensor inputs recorded in a, b, c (in this order)
    backward: str  # PL/pgSQL statements of its backward rule (see the module docstring)
    args: tuple[tuple[str, str], ...] = ()  # named arguments kept in the record: (name, SQL type)
    wrapper: str | None = None  # llm_t_<name>'s arguments after p_tape (None: the op module writes its own)
    kernel: str = ""  # the forward call the generated wrapper records, over the wrapper's arguments
    note: str = ""  # the op's forward and backward in one line, for llm_backward's comment

    def __post_init__(self) -> None:
        if not 1 <= len(self.inputs) <= len(TAPE_COLUMNS):
            raise ValueError(f"op {self.name}: 1 to {len(TAPE_COLUMNS)} tensor inputs, got {self.inputs}")
        names = [*self.inputs, *(a for a, _ in self.args)]
        if len(set(names)) != len(names) or "g" in names:
            raise ValueError(f"op {self.name}: input and argument names must be distinct and not 'g': {names}")

    def record(self, out: str, values: dict[str, str] | None = None) -> str:
        """The SQL call recording this op: out and inputs/arguments as SQL expressions (default p_<name>)."""
        v = {n: f"p_{n}" for n in (*self.inputs, *(a for a, _ in self.args))} | (values or {})
        ins = ", ".join(v[n] for n in self.inputs)
        args = ", ".join(f"'{a}', {v[a]}" for a, _ in self.args)
        rec = f", p_args => jsonb_build_object({args})" if self.args else ""
        return f"llm_tape_record(p_tape, '{self.name}', {out}, {ins}{rec})"

    def rule(self) -> str:
        """The backward rule with its names bound to the tape row r."""
        bound = {n: f"r.{c}" for n, c in zip(self.inputs, TAPE_COLUMNS, strict=False)}
        for a, t in self.args:
            bound[a] = (f"ARRAY(SELECT jsonb_array_elements_text(r.args -> '{a}'))::{t}" if t.endswith("[]")
                        else f"(r.args ->> '{a}')::{t}")
        bound["g"] = "g"

        def sub(m: re.Match) -> str:
            if m.group(1) not in bound:
                raise KeyError(f"op {self.name}: its backward names {{{m.group(1)}}}, not an input or argument")
            return bound[m.group(1)]
        body = re.sub(r"\{(\w+)\}", sub, textwrap.dedent(self.backward).strip("\n"))
        body = re.sub(r"\bacc\(", "PERFORM llm_grad_acc(p_tape, ", body)
        return re.sub(r"\blike\(", "llm_tensor_like(", body)


def ops() -> list[Op]:
    """Every registered op, from the OP of each module of pg_llm.ops (sorted by op name)."""
    import pg_llm.ops

    found = []
    for info in pkgutil.iter_modules(pg_llm.ops.__path__):
        op = getattr(importlib.import_module(f"pg_llm.ops.{info.name}"), "OP", None)
        found += op if isinstance(op, tuple) else [op] if op is not None else []
    names = [o.name for o in found]
    if len(set(names)) != len(names):
        raise SystemExit(f"two ops registered under one name: {sorted(names)}")
    return sorted(found, key=lambda o: o.name)


def op(name: str) -> Op:
    """The registered op `name` (for a module recording another op, e.g. linear's fused add)."""
    for o in ops():
        if o.name == name:
            return o
    raise KeyError(f"no op {name!r} is registered")
