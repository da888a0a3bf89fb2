"""The calculator: exact values for what it accepts, ToolError for every escape attempt."""

import time

import pytest

from chibichat.tools import ToolError, calculate, known_result, run_tool


@pytest.mark.parametrize(
    "expr, want",
    [
        ("1+2", "3"),
        ("2*(3+4)", "14"),
        ("7/2", "3.5"),
        ("8/4", "2"),
        ("7//2", "3"),
        ("-7 % 3", "2"),
        ("-(3 - 5)", "2"),
        ("2**10", "1024"),
        ("1,234 + 1", "1235"),
        ("1,234,567 * 2", "2469134"),
        ("1,234.5 * 2", "2469"),
        ('"a,b".count(",") + 1,000', "1001"),
        ("0.1 + 0.2", "0.3"),
        ("1/3", "0.3333333333"),
        ('"strawberry".count("r")', "3"),
        ("'banana'.count('an')", "2"),
        ('"a,b,c".count(",")', "2"),
        ('"-".join("river")', "r-i-v-e-r"),
        ('"-".join(" river".strip())', "r-i-v-e-r"),
        ('"・".join("リンゴ")', "リ・ン・ゴ"),
        ('" bliss".strip().count("s")', "2"),
        ('"-".join("")', ""),
        ("(" * 50 + "1" + ")" * 50, "1"),
        # below 1e-4 ten significant digits, not ten decimals (which gave "0.0")
        ("2**-40", "9.094947018e-13"),
        ("6.626e-34*3e8", "1.9878e-25"),
        ("1/30000", "3.333333333e-05"),
        ("-1/30000", "-3.333333333e-05"),
        ("1.5e-5", "1.5e-05"),
        ("1/3000", "0.0003333333"),
        ("1e20 / 3", "3.333333333333333e+19"),  # above 1e15: repr, as before
    ],
)
def test_calculate_values(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr", ["1,5+1", "(3,4)", "1,2345", "12,345,67", "1.5,000", "2*(1, 000)"])
def test_calculate_refuses_commas_outside_thousands_groups(expr):
    # they were all stripped: "1,5+1" gave 16 and "(3,4)" gave 34
    with pytest.raises(ToolError, match=r"^a comma is allowed only in a thousands group such as 1,234$"):
        calculate(expr)
    assert run_tool("calculator", expr) == "Error: a comma is allowed only in a thousands group such as 1,234"


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "().__class__.__bases__[0].__subclasses__()",
        "(lambda: 1)()",
        "open('/etc/passwd').read()",
        "x + 1",
        "[1, 2][0]",
        "[c for c in 'ab']",
        "'abc'.upper()",
        "'abc'.count(x)",
        "'abc'.count('a', 1)",
        "'abc'.strip('a')",
        "'-'.join('abc', 'd')",
        "'-'.join(['a', 'b'])",
        "'-'.join('abc'.count('a'))",
        "'abc'.count('a').strip()",
        "'-'.join('ab') + 'c'",
        "'-'.join(x)",
        "'abc'.join(sep='-')",
        "'-' * 2",
        "('x' * 999).join('a' * 999)",
        "'" + "ab" * 300 + "'.join('abc')",
        "'ab' * 3",
        "'ab' + 'c'",
        "True + 1",
        "1j * 2",
        "2 ** 1000000",
        "10 ** 65",
        "(10**30) ** 5",
        "9" * 150 + " * 10",
        "1/0",
        "5 % 0",
        "",
        "1 +",
        "1 if 1 else 2",
        "'x'",
        "-" * 5000 + "1",
        "'a'.count('')",
        "2.0 ** 64 * 1e300 * 1e300",
    ],
)
def test_calculate_refuses(expr):
    with pytest.raises(ToolError):
        calculate(expr)


def test_tool_error_is_value_error():
    assert issubclass(ToolError, ValueError)


def test_huge_power_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(ToolError):
        calculate("9 ** 9 ** 9")
    assert time.perf_counter() - t0 < 1.0


def test_calculate_refuses_lone_surrogates():
    # "\ud800".strip() returned a lone surrogate, which the engine could not tokenize: the whole generation
    # (a chat reply, an RL rollout batch) ended with a ChibiError instead of the call getting an error result
    with pytest.raises(ToolError, match=r"^string literal has a lone surrogate U\+D800, which is no character$"):
        calculate('"\\ud800".strip()')
    want = "Error: string literal has a lone surrogate U+DCFF, which is no character"
    assert run_tool("calculator", '"-".join("a\\udcff")') == want


def test_known_result_is_run_tools_result_without_running_code(monkeypatch):
    import chibichat.sandbox

    monkeypatch.setattr(chibichat.sandbox, "run_python", lambda *a, **k: pytest.fail("the sandbox was started"))
    assert known_result("calculator", "1,234 + 1") == run_tool("calculator", "1,234 + 1") == "1235"
    assert known_result("calculator", "1/0") == run_tool("calculator", "1/0") == "Error: division by zero"
    assert known_result("python", "6*7") == "42"
    for source in ("1/0", "1,234", "print(1)"):  # python: what the calculator refuses runs in the sandbox
        assert known_result("python", source) is None
