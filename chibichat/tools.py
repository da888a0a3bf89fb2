"""The calculator tool the model calls between <|python_start|> and <|python_end|>.

Upstream evaluated the model's text with `eval` behind a character whitelist and a substring
blacklist, which was escaped more than once. Here the expression is parsed
with `ast.parse(mode="eval")` and walked by a tiny interpreter that knows only a whitelist of node
types: numbers, + - * / // % ** (bounded), unary +/-, parentheses, and three string methods on string
literals: `.count(s)` (letter counting: `"strawberry".count("r")`), `.join(s)` and `.strip()` (spelling:
`"-".join("river")` -> "r-i-v-e-r", `"-".join(" river".strip())` for a word written with its leading
space). Anything else -- names, other calls or attributes, subscripts, lambdas, comprehensions -- raises
ToolError before anything is evaluated. A result is a number, or a string when the outermost node is one
of those string methods (a bare string literal is not a calculation).

`run_tool` is what the engine runs for a call: the calculator, else (tools "python") the code in the
sandbox; a failed call's result is "Error: <why>", which is what the model then reads as the output.
`known_result` is run_tool's result where it is known without running code (the calculator's part).
"""

from __future__ import annotations

import ast
import math
import operator
import re

# Bounds that keep one tool call cheap whatever the model writes. They are about the tool, not the
# model's context: the result is tokenized and forced into the context afterwards, and the engine
# checks that fit against the row's remaining budget (a result that does not fit is replaced by an error).
MAX_EXPR_CHARS = 1000
MAX_OUTPUT_CHARS = 100_000  # a python call's output past this is an error (more than any context here shows)
MAX_ABS_EXPONENT = 64  # x ** y with |y| > 64 is refused (2 ** 10**9 would hang the process)
MAX_INT_DIGITS = 100  # results and intermediates with more digits are refused
MAX_STR_CHARS = 1000  # string literals and string results (.join, .strip)
STRING_METHODS = {"count": 1, "join": 1, "strip": 0}  # method -> number of (string) arguments


class ToolError(ValueError):
    """The expression is not something the calculator evaluates (or it overflows a bound)."""


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ToolError(f"result {x!r} is not a number")
    if isinstance(x, int) and x != 0 and math.log10(abs(x)) >= MAX_INT_DIGITS:
        raise ToolError(f"integer result exceeds {MAX_INT_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError("result is not finite")
    return x


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or v is None or isinstance(v, (complex, bytes)):
            raise ToolError(f"constant {v!r} is not allowed")
        if isinstance(v, str):
            if len(v) > MAX_STR_CHARS:
                raise ToolError(f"string literal longer than {MAX_STR_CHARS} characters")
            # an escape such as "\ud800" makes a lone surrogate, which is no character: a result holding one
            # could not be tokenized, and that would end the whole generation instead of this call
            bad = next((c for c in v if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:
                raise ToolError(f"string literal has a lone surrogate U+{ord(bad):04X}, which is no character")
            return v
        return _check_number(v)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _eval(node.operand)
        if isinstance(operand, str):
            raise ToolError("unary operator on a string")
        return _check_number(_UNARY[type(node.op)](operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise ToolError("arithmetic on strings is not allowed")
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_ABS_EXPONENT:
                raise ToolError(f"exponent {right!r} exceeds the bound {MAX_ABS_EXPONENT}")
            if abs(left) >= 10 ** (MAX_INT_DIGITS // 4) and abs(right) > 4:
                raise ToolError("power result would be too large")
        try:
            return _check_number(_BINOPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("numeric overflow") from None
    if isinstance(node, ast.Call):
        # Only "<string>".<method>(<string>...) for the methods of STRING_METHODS, the receiver a string
        # literal or another such call; no names, no keywords, no other methods.
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr in STRING_METHODS and not node.keywords
                and len(node.args) == STRING_METHODS[f.attr]):
            raise ToolError('only the forms "text".count("x"), "-".join("text") and "text".strip() may be called')
        receiver, args = _eval(f.value), [_eval(a) for a in node.args]
        if not isinstance(receiver, str) or not all(isinstance(a, str) for a in args):
            raise ToolError(f".{f.attr}() is called on strings with string arguments only")
        if f.attr == "count":
            if args[0] == "":
                raise ToolError('.count("") is not meaningful')
            return receiver.count(args[0])
        if f.attr == "strip":
            return receiver.strip()
        text = args[0]  # join: the receiver goes between the characters of the argument
        if len(text) + len(receiver) * max(len(text) - 1, 0) > MAX_STR_CHARS:
            raise ToolError(f"joined string would be longer than {MAX_STR_CHARS} characters")
        return receiver.join(text)
    raise ToolError(f"{type(node).__name__} is not allowed in a calculator expression")


def _format(value) -> str:
    # Ten decimals is the format training data carries ("0.3333333333"); below 1e-4, where repr writes an
    # exponent anyway, ten decimals would drop the digits that matter (2**-40 -> "0.0"): ten significant
    # digits there.
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) < 1e-4:
            return f"{value:.10g}"
        return repr(round(value, 10))
    return str(value)


_STRING_LITERAL = re.compile(r"""("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")
# a thousands group: 1-3 digits, then groups of exactly three, not inside a longer number or a name
_THOUSANDS = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?!\d)")


def _strip_thousands(expr: str) -> tuple[str, bool]:
    """`expr` with the commas of thousands groups ("1,234") removed outside string literals, and whether
    another comma is left outside them."""
    pieces = _STRING_LITERAL.split(expr)  # odd indices: string literals, kept as written
    for i in range(0, len(pieces), 2):
        pieces[i] = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), pieces[i])
    return "".join(pieces), any("," in p for p in pieces[::2])


def calculate(expr: str, thousands: bool = True) -> str:
    """Evaluate a calculator expression and return its result as text.

    Thousands separators ("1,234") are stripped, because models write them (thousands=False, for python
    source, keeps every comma: there they build tuples and separate arguments); a comma inside a string
    literal is kept, and any other comma is refused. Raises ToolError on anything outside the whitelist.
    """
    if not isinstance(expr, str):
        raise ToolError("expression must be a string")
    if len(expr) > MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if thousands:
        expr, other_comma = _strip_thousands(expr)
        if other_comma:
            raise ToolError("a comma is allowed only in a thousands group such as 1,234")
    expr = expr.strip()
    if not expr:
        raise ToolError("empty expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:  # its message alone: the "(<unknown>, line 1)" of str(e) says nothing here
        raise ToolError(f"not a valid expression: {e.msg}") from None
    except ValueError as e:  # null bytes
        raise ToolError(f"not a valid expression: {e}") from None
    except (RecursionError, MemoryError):
        raise ToolError("expression is nested too deeply") from None
    try:
        value = _eval(tree)
    except RecursionError:
        raise ToolError("expression is nested too deeply") from None
    if isinstance(value, str) and not isinstance(tree.body, ast.Call):
        raise ToolError("result is a string, not a number")
    return _format(value)


TOOL_ERROR_CHARS = 160  # an error shown to the model is cut here: its first line says what went wrong


def run_tool(kind: str, source: str) -> str:
    """Result text of one tool call; a failed call's result is "Error: <why>" (the model and the reader
    of the transcript see that the call failed, instead of no output at all)."""
    try:
        return calculate(source, thousands=kind != "python")
    except ToolError as e:
        if kind != "python":
            return tool_error(str(e))
    from chibichat.sandbox import run_python  # the sandbox starts a process: loaded only when python runs

    code = source
    try:
        ast.parse(source, mode="eval")
        # a bare expression: show its value unless it is None (`print(x)` shows x once), like a REPL; on
        # lines of its own so that a trailing comment does not swallow the closing parenthesis
        code = f"__value = (\n{source}\n)\nif __value is not None:\n    print(__value)"
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        pass  # not an expression (or one the parser gives up on): run it as a script, which reports why
    result = run_python(code, timeout_s=2.0, memory_mb=256)
    if result.ok:
        out = result.stdout.strip()
        if len(out) > MAX_OUTPUT_CHARS:
            return tool_error(f"output of {len(out)} characters exceeds the {MAX_OUTPUT_CHARS} a call may return")
        return out
    # the exception's own text ("NameError: name 'x' is not defined"): what follows the traceback's
    # last indented line
    lines = result.stderr.strip().splitlines()
    indented = [i for i, line in enumerate(lines) if line[:1].isspace()]
    exception = " ".join(lines[indented[-1] + 1 :] if indented else lines).strip()
    return tool_error(exception if exception and not result.timed_out else result.error or "the call failed")


def known_result(kind: str, source: str) -> str | None:
    """What `run_tool(kind, source)` returns, where that is known without running any code (the server checks a
    tool call that a client sends back in its chat history with it): for the calculator its value or its error;
    for python the calculator's value only, since whatever the calculator refuses runs in the sandbox, which is
    never started for this. None: not known that way (or the call would fail outside the calculator's own
    checks, which the engine reports as "the tool failed")."""
    try:
        return calculate(source, thousands=kind != "python")
    except ToolError as e:
        return tool_error(str(e)) if kind != "python" else None
    except Exception:
        return None


def tool_error(why: str) -> str:
    why = " ".join(why.split())
    return "Error: " + (why if len(why) <= TOOL_ERROR_CHARS else why[: TOOL_ERROR_CHARS - 3] + "...")
