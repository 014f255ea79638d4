"""Strict, AST-based parsing of model-written function calls; nothing in the model's text is ever evaluated.

BFCL's native format is a Python list of calls, ``[cd(folder='document'), mkdir(dir_name='temp')]``. BFCL's own
harness runs such text with ``eval()``. This module instead parses it with :func:`ast.parse` and accepts only

- top-level calls ``name(...)`` of a plain function name from the caller's allowed set (the task's currently
  declared functions), as a single call, a list or a tuple of calls;
- arguments that are literals: ``str``/``int``/``float``/``bool``/``None`` constants, unary minus/plus on a
  number, and (nested) lists, tuples and dicts of those, bounded in size and depth.

Everything else is rejected with a clear, stable error string (:class:`CallParseError`): attribute access,
dunder or private names, nested calls, comprehensions, lambdas, names/variables, starred or double-starred
arguments, f-strings, operators, imports (a syntax error in an expression), oversized or too deeply nested literals.

The same validation applies to JSON arguments of Hermes tool calls (:func:`validate_arguments`), and
:func:`render_call` re-renders a validated call as Python source from ``repr`` of the validated values (and
re-parses its own output as a self-check), which is the only text ever handed to a benchmark helper.
"""

from __future__ import annotations

import ast
import keyword
import math
from dataclasses import dataclass, field
from typing import Any, Iterable


class CallParseError(ValueError):
    """The text or the arguments are not an acceptable call. ``str(exc)`` is a short, human-readable reason."""


@dataclass(frozen=True)
class ParseLimits:
    max_text_chars: int = 50_000
    max_calls: int = 64
    max_depth: int = 6  # nesting of lists/tuples/dicts inside an argument
    max_elements: int = 2_000  # literal nodes in one call
    max_str_chars: int = 10_000
    max_int_digits: int = 40
    max_args: int = 32


DEFAULT_LIMITS = ParseLimits()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


_NODE_REASONS = {
    ast.Attribute: "attribute access is not allowed",
    ast.Call: "nested calls are not allowed (arguments must be literals)",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.Starred: "starred arguments are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.BinOp: "operators are not allowed (arguments must be literals)",
    ast.BoolOp: "operators are not allowed (arguments must be literals)",
    ast.Compare: "operators are not allowed (arguments must be literals)",
    ast.IfExp: "conditional expressions are not allowed",
    ast.NamedExpr: "assignment expressions are not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Set: "sets are not allowed (use a list)",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Slice: "slices are not allowed",
}


def _check_name(name: str, what: str) -> None:
    if name.startswith("__") or name.endswith("__"):
        raise CallParseError(f"dunder name {name!r} is not allowed")
    if name.startswith("_"):
        raise CallParseError(f"private {what} {name!r} is not allowed")
    if not name.isidentifier() or keyword.iskeyword(name):
        raise CallParseError(f"{what} {name!r} is not a valid identifier")


class _Budget:
    def __init__(self, limits: ParseLimits):
        self.limits = limits
        self.elements = 0

    def tick(self) -> None:
        self.elements += 1
        if self.elements > self.limits.max_elements:
            raise CallParseError(f"literal too large (more than {self.limits.max_elements} elements)")


def _check_scalar(value: Any, limits: ParseLimits) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if len(str(abs(value))) > limits.max_int_digits:
            raise CallParseError(f"integer literal too large (more than {limits.max_int_digits} digits)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CallParseError("non-finite number is not allowed")
        return value
    if isinstance(value, str):
        if len(value) > limits.max_str_chars:
            raise CallParseError(f"string literal too long (more than {limits.max_str_chars} characters)")
        return value
    raise CallParseError(f"literal of type {type(value).__name__} is not allowed")


def _literal(node: ast.AST, depth: int, budget: _Budget) -> Any:
    limits = budget.limits
    budget.tick()
    if depth > limits.max_depth:
        raise CallParseError(f"literal nested too deeply (more than {limits.max_depth} levels)")
    if isinstance(node, ast.Constant):
        return _check_scalar(node.value, limits)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if (isinstance(operand, ast.Constant) and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)):
            value = _check_scalar(operand.value, limits)
            return -value if isinstance(node.op, ast.USub) else value
        raise CallParseError("unary minus/plus is only allowed on a number")
    if isinstance(node, ast.List):
        return [_literal(e, depth + 1, budget) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e, depth + 1, budget) for e in node.elts)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise CallParseError("double-starred arguments are not allowed")
            key = _literal(k, depth + 1, budget)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CallParseError("dict keys must be strings or integers")
            out[key] = _literal(v, depth + 1, budget)
        return out
    if isinstance(node, ast.Name):
        if node.id.startswith("__") or node.id.endswith("__"):
            raise CallParseError(f"dunder name {node.id!r} is not allowed")
        raise CallParseError(f"name {node.id!r} is not allowed (arguments must be literals)")
    for kind, reason in _NODE_REASONS.items():
        if isinstance(node, kind):
            raise CallParseError(reason)
    raise CallParseError(f"{type(node).__name__} is not allowed (arguments must be literals)")


def _call(node: ast.AST, allowed: frozenset[str], limits: ParseLimits) -> ParsedCall:
    if not isinstance(node, ast.Call):
        for kind, reason in _NODE_REASONS.items():
            if isinstance(node, kind):
                raise CallParseError(reason)
        raise CallParseError("expected a function call like name(arg=value)")
    if isinstance(node.func, ast.Attribute):
        raise CallParseError("attribute access is not allowed")
    if not isinstance(node.func, ast.Name):
        raise CallParseError("the called object must be a plain function name")
    name = node.func.id
    _check_name(name, "function")
    if name not in allowed:
        raise CallParseError(f"unknown function {name!r}; available: {', '.join(sorted(allowed)) or 'none'}")
    if len(node.args) + len(node.keywords) > limits.max_args:
        raise CallParseError(f"too many arguments (more than {limits.max_args})")
    budget = _Budget(limits)
    args = []
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise CallParseError("starred arguments are not allowed")
        args.append(_literal(arg, 0, budget))
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise CallParseError("double-starred arguments are not allowed")
        _check_name(kw.arg, "argument name")
        kwargs[kw.arg] = _literal(kw.value, 0, budget)
    return ParsedCall(name, tuple(args), kwargs)


def parse_python_calls(text: str, allowed: Iterable[str], limits: ParseLimits = DEFAULT_LIMITS) -> list[ParsedCall]:
    """Parse ``[f(a=1), g('x')]`` (or a single call, or a tuple of calls) into :class:`ParsedCall` s.

    Raises :class:`CallParseError` with a clear reason; never evaluates anything.
    """
    if not isinstance(text, str):
        raise CallParseError("call text must be a string")
    if len(text) > limits.max_text_chars:
        raise CallParseError(f"call text too long (more than {limits.max_text_chars} characters)")
    stripped = text.strip()
    if not stripped:
        raise CallParseError("empty call text")
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        raise CallParseError(f"not a Python call expression (syntax error: {exc.msg})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CallParseError(f"not a Python call expression ({type(exc).__name__})") from None
    body = tree.body
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    if len(nodes) > limits.max_calls:
        raise CallParseError(f"too many calls (more than {limits.max_calls})")
    allowed_set = frozenset(allowed)
    try:
        return [_call(n, allowed_set, limits) for n in nodes]
    except RecursionError:
        raise CallParseError("literal nested too deeply") from None


def validate_value(value: Any, limits: ParseLimits = DEFAULT_LIMITS, _depth: int = 0, _budget=None) -> Any:
    """Validate a JSON-decoded argument value with the same bounds as the AST parser (dict keys: str)."""
    budget = _budget or _Budget(limits)
    budget.tick()
    if _depth > limits.max_depth:
        raise CallParseError(f"literal nested too deeply (more than {limits.max_depth} levels)")
    if isinstance(value, (list, tuple)):
        items = [validate_value(v, limits, _depth + 1, budget) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CallParseError("dict keys must be strings or integers")
            _check_scalar(k, limits)
            out[k] = validate_value(v, limits, _depth + 1, budget)
        return out
    return _check_scalar(value, limits)


def validate_arguments(name: str, arguments: Any, allowed: Iterable[str],
                       limits: ParseLimits = DEFAULT_LIMITS) -> ParsedCall:
    """Validate a Hermes/JSON call ``{"name": name, "arguments": {...}}`` against the allowed functions."""
    if not isinstance(name, str):
        raise CallParseError("function name must be a string")
    _check_name(name, "function")
    allowed_set = frozenset(allowed)
    if name not in allowed_set:
        raise CallParseError(f"unknown function {name!r}; available: {', '.join(sorted(allowed_set)) or 'none'}")
    if not isinstance(arguments, dict):
        raise CallParseError("arguments must be a JSON object")
    if len(arguments) > limits.max_args:
        raise CallParseError(f"too many arguments (more than {limits.max_args})")
    budget = _Budget(limits)
    kwargs = {}
    for key, value in arguments.items():
        if not isinstance(key, str):
            raise CallParseError("argument names must be strings")
        _check_name(key, "argument name")
        kwargs[key] = validate_value(value, limits, 0, budget)
    return ParsedCall(name, (), kwargs)


def render_call(call: ParsedCall, limits: ParseLimits = DEFAULT_LIMITS) -> str:
    """Python source of a validated call, built only from ``repr`` of validated literals.

    The result is re-parsed with :func:`parse_python_calls` as a self-check, so the returned string is, by
    construction, a single call of ``call.name`` with literal arguments.
    """
    _check_name(call.name, "function")
    parts = [repr(validate_value(a, limits)) for a in call.args]
    for key, value in call.kwargs.items():
        _check_name(key, "argument name")
        parts.append(f"{key}={validate_value(value, limits)!r}")
    text = f"{call.name}({', '.join(parts)})"
    reparsed = parse_python_calls(text, {call.name}, limits)
    if len(reparsed) != 1 or reparsed[0].name != call.name:  # pragma: no cover - defensive
        raise CallParseError("internal error: rendered call did not re-parse")
    return text
