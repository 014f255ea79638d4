"""Strict AST parser for model-written calls (verl_hindsight.envs.call_parser): accepts literal calls of declared
functions only, rejects everything else with a clear reason, and never executes anything."""

from __future__ import annotations

import os

import pytest

from verl_hindsight.envs.call_parser import (
    CallParseError,
    ParsedCall,
    parse_python_calls,
    render_call,
    validate_arguments,
)

ALLOWED = {"cd", "mkdir", "sort", "echo", "post_tweet"}


def test_accepts_bfcl_call_lists():
    calls = parse_python_calls("[cd(folder='document'), mkdir(dir_name='temp'), sort('final_report.pdf')]", ALLOWED)
    assert calls == [ParsedCall("cd", (), {"folder": "document"}), ParsedCall("mkdir", (), {"dir_name": "temp"}),
                     ParsedCall("sort", ("final_report.pdf",), {})]
    single = parse_python_calls("post_tweet(content='hi', tags=['#a', '#b'], mentions=(), n=-3, x=+1.5, d={'k': [1, None, True]})",
                                ALLOWED)
    assert single[0].kwargs == {"content": "hi", "tags": ["#a", "#b"], "mentions": (), "n": -3, "x": 1.5,
                                "d": {"k": [1, None, True]}}


@pytest.mark.parametrize("text, reason", [
    ("[os.system('ls')]", "attribute access"),
    ("[cd(folder=os.path)]", "attribute access"),
    ("[cd(folder='a').__class__]", "attribute access"),
    ("[__import__('os')]", "dunder name"),
    ("[cd(folder=__file__)]", "dunder name"),
    ("[cd(__folder='x')]", "dunder name"),
    ("[cd(_folder='x')]", "private"),
    ("[cd(folder=mkdir(dir_name='x'))]", "nested calls"),
    ("[cd(folder=[c for c in 'abc'])]", "comprehensions"),
    ("[cd(folder={c: 1 for c in 'abc'})]", "comprehensions"),
    ("[cd(folder=(c for c in 'ab'))]", "comprehensions"),
    ("[cd(folder=lambda: 1)]", "lambdas"),
    ("import os", "syntax error"),
    ("[cd(*['x'])]", "starred"),
    ("[cd(**{'folder': 'x'})]", "double-starred"),
    ("[cd(folder=f'{1}')]", "f-strings"),
    ("[cd(folder='a' + 'b')]", "operators"),
    ("[cd(folder=x)]", "name 'x' is not allowed"),
    ("[rm(file='x')]", "unknown function 'rm'"),
    ("[cd(folder='" + "a" * 20_000 + "')]", "too long"),
    ("[cd(folder=" + "9" * 100 + ")]", "integer literal too large"),
    ("[cd(folder=1e999)]", "non-finite"),
    ("[cd(folder=" + "[" * 50 + "]" * 50 + ")]", "nested too deeply"),
    ("[cd(folder=[" + ",".join(["1"] * 5000) + "])]", "literal too large"),
    ("[cd(folder=b'x')]", "bytes"),
    ("[cd(folder={1, 2})]", "sets"),
])
def test_rejects_with_clear_reason(text, reason):
    with pytest.raises(CallParseError) as exc:
        parse_python_calls(text, ALLOWED)
    assert reason in str(exc.value)


def test_nothing_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    attacks = [
        f"[__import__('os').system('touch {marker}')]",
        f"[mkdir(dir_name=open('{marker}', 'w'))]",
        f"[mkdir(dir_name=__import__('pathlib').Path('{marker}').touch())]",
        f"[echo(content=(lambda: open('{marker}', 'w'))())]",
        f"[echo(content=[open('{marker}', 'w') for _ in [0]])]",
    ]
    for text in attacks:
        with pytest.raises(CallParseError):
            parse_python_calls(text, ALLOWED)
    assert not marker.exists()


def test_json_arguments_are_bounded_and_rendered_as_literals(tmp_path):
    marker = tmp_path / "pwned"
    # a string that would be code if it were pasted unquoted: repr() keeps it a literal
    payload = f"x'); open('{marker}', 'w'); ('"
    call = validate_arguments("mkdir", {"dir_name": payload}, ALLOWED)
    text = render_call(call)
    assert parse_python_calls(text, {"mkdir"})[0].kwargs == {"dir_name": payload}
    assert not marker.exists()
    for name, args, reason in [
        ("__class__", {}, "dunder name"),
        ("_load_scenario", {}, "private function"),
        ("rm", {}, "unknown function"),
        ("cd", {"__dict__": 1}, "dunder name"),
        ("cd", [], "arguments must be a JSON object"),
        ("cd", {"folder": "a" * 20_000}, "too long"),
        ("cd", {"folder": float("nan")}, "non-finite"),
        ("cd", {"folder": [[[[[[[[["deep"]]]]]]]]]}, "nested too deeply"),
    ]:
        with pytest.raises(CallParseError) as exc:
            validate_arguments(name, args, ALLOWED)
        assert reason in str(exc.value)
    assert not os.path.exists(marker)
