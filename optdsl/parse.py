"""Text → AST: the Lark grammar, friendly syntax errors, and the tree → dataclass transform."""
from __future__ import annotations

import functools
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast, axes
from .errors import Span, SpecError


def grammar_text() -> str:
    """The grammar ships inside the wheel (optdsl/grammars) and lives in grammars/ in the repo."""
    shipped = resources.files("optdsl").joinpath("grammars").joinpath("optdsl.lark")
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "grammars" / "optdsl.lark").read_text(encoding="utf-8")


MACHINE_EPS = 2.0 ** -23  # float32's: what the analyses take for a hyperparameter that defaults to None


class _ContinueInBrackets:
    """Drop newlines inside ( ) and range brackets, so an expression may span lines."""

    always_accept = ("_NL",)
    _open, _close = {"LPAR", "LSQB"}, {"RPAR", "RSQB"}

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in self._open:
                depth += 1
            elif tok.type in self._close:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@functools.cache
def parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, strict=True,
                postlex=_ContinueInBrackets(), maybe_placeholders=True)


def _span(node) -> Span:
    return Span(node.line, node.column, node.end_line, node.end_column)


def _number(tok: Token) -> float:
    return float(tok)


@v_args(meta=True)
class _ToAst(Transformer):
    # ---- expressions ----
    def number(self, meta, children):
        return ast.Num(_number(children[0]), _span(meta))

    def negative(self, meta, children):
        return ast.Num(-children[0].value, _span(meta))

    def name(self, meta, children):
        return ast.Name(str(children[0]), _span(meta))

    def call(self, meta, children):
        func, *args = children
        args = tuple(a for a in args if a is not None)
        return ast.Call(str(func), args, _span(meta), _span(func))

    def _binary(op):
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[1], _span(meta))
        return build

    add, sub, mul, div, mod = _binary("+"), _binary("-"), _binary("*"), _binary("/"), _binary("%")

    def pow(self, meta, children):
        return ast.BinOp("^", children[0], children[2], _span(meta))

    def compare(self, meta, children):
        return ast.BinOp(str(children[1]), children[0], children[2], _span(meta))

    def and_(self, meta, children):  # a rule's condition: `ndim == 2 and use_muon`
        return ast.BinOp("and", children[0], children[1], _span(meta))

    def or_(self, meta, children):
        return ast.BinOp("or", children[0], children[1], _span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[0], _span(meta))

    def index(self, meta, children):
        name, _, var, _ = children
        return ast.Index(str(name), str(var), _span(meta))

    # ---- declarations ----
    def header(self, meta, children):
        name, doc = children
        return ("header", str(name), str(doc)[1:-1] if doc is not None else "", _span(name))

    def range(self, meta, children):
        open_, lo, hi, close = children
        return ast.Range(lo.value, hi.value, open_.type == "LSQB", close.type == "RSQB", _span(meta))

    def hyper_item(self, meta, children):
        name, default, range_, only, keyword = children
        optional = isinstance(default, Token) and default.type == "NONE"
        flag = isinstance(default, Token) and not optional  # True or False; a number is already an ast.Num
        if flag and range_ is not None:
            raise SpecError(f"the flag '{name}' takes no range", range_.span,
                            hint="a flag is True or False; remove 'in ...'")
        if only is not None and range_ is not None:
            raise SpecError(f"'{name}' is fixed by 'only', so a range says nothing", range_.span,
                            hint="remove 'in ...' or 'only'")
        if optional and only is not None:
            raise SpecError(f"'{name}' defaults to None, so 'only' would accept nothing else", _span(name),
                            hint="remove 'only', or give a number")
        # None is the machine epsilon of p's dtype; the analyses take float32's
        value = float(default == "True") if flag else MACHINE_EPS if optional else default.value
        return ast.Hyper(str(name), value, range_, _span(name), keyword=keyword and str(keyword), flag=flag,
                         only=only is not None, keyword_span=keyword and _span(keyword), optional=optional)

    def hyper_choice(self, meta, children):
        name, *choices, keyword = children
        values = tuple(None if c.type == "NONE" else str(c)[1:-1] for c in choices)
        for c, value in zip(choices, values):
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
                raise SpecError(f"the choice {str(c)} is not a plain name", _span(c),
                                hint="a choice is None or a string of letters, digits, '_', '.' and '-'")
        if len(set(values)) < len(values):
            raise SpecError(f"'{name}' lists a choice twice", _span(meta), hint="list each choice once")
        # in the math the choice is its index: 0 for the first (the default), 1 for the next, ...
        return ast.Hyper(str(name), 0.0, ast.Range(0.0, len(values) - 1.0, True, True, _span(meta)), _span(name),
                         keyword=keyword and str(keyword), keyword_span=keyword and _span(keyword), choices=values)

    def hyper_tuple(self, meta, children):
        keyword, *members = children
        return ast.HyperTuple(str(keyword), tuple(map(str, members)), _span(keyword),
                              tuple(_span(m) for m in members))

    def hyper_decl(self, meta, children):
        return ("hyper", children)

    def state_item(self, meta, children):
        name, shape, init, key, eager = children
        return ast.State(str(name), init, _span(name), shape=str(shape) if shape else "full",
                         shape_span=shape and _span(shape), key=key and str(key), key_span=key and _span(key),
                         eager=eager is not None)

    def list_item(self, meta, children):
        name, _, var, _, first, v1, cond, second, v2, init, key = children
        for word, v in ((first, v1), (second, v2)):
            if str(v) != str(var):
                raise SpecError(f"the state list '{name}[{var}]' names its kinds along '{var}', not '{v}'", _span(v),
                                hint=f"write {word}({var})")
        if {str(first), str(second)} != {"axis", "gram"}:
            raise SpecError(f"a state list's kinds are axis({var}) and gram({var}), one of each", _span(first),
                            hint=f"write 'axis({var}) if COND else gram({var})'")
        return ast.StateList(str(name), str(var), (str(first), str(second)), cond, init, _span(name),
                             key=key and str(key))

    def matrix_shape(self, meta, children):
        """`matrix(A, B)` as one name token, "matrix(A, B)", spanning the whole form (ir.matrix_dims reads it)."""
        word, a, b = children
        tok = Token("NAME", f"{word}({a}, {b})", word.start_pos, word.line, word.column,
                    meta.end_line, meta.end_column, meta.end_pos)
        return tok

    def axis_shape(self, meta, children):
        """`gram(K)` / `axis(K)` as one name token, "gram(K)", spanning the whole form (ir.axis_kind reads it)."""
        word, k = children
        return Token("NAME", f"{word}({k})", word.start_pos, word.line, word.column,
                     meta.end_line, meta.end_column, meta.end_pos)

    def state_decl(self, meta, children):
        return ("state", children)

    def assign(self, meta, children):
        name, value = children
        return ast.Assign(str(name), "=", value, _span(meta), _span(name))

    def aug_assign(self, meta, children):
        name, op, value = children
        return ast.Assign(str(name), str(op), value, _span(meta), _span(name))

    def index_assign(self, meta, children):
        name, _, var, _, value = children
        return ast.Assign(f"{name}[{var}]", "=", value, _span(meta), _span(meta))

    def group_assign(self, meta, children):
        word, name, value = children
        if word != "group":
            raise SpecError(f"two names in a row: '{word} {name}'", _span(word),
                            hint="a statement is NAME = EXPR; 'group NAME = EXPR' computes a value over the "
                                 "whole parameter group")
        return ast.Assign(str(name), "=", value, _span(meta), _span(name), group=True)

    @staticmethod
    def _no_group_statement(items, where):
        for item in items:
            if isinstance(item, ast.Assign) and item.group:
                raise SpecError(f"a group statement cannot stand inside {where}", item.span,
                                hint="write 'group NAME = ...' at the top level, above the per-parameter statements")

    def _block_body(self, items):
        return tuple(i for i in items if i is not None)

    def repeat_block(self, meta, children):
        count, *items = children
        self._no_group_statement(items, "a 'repeat' block")
        arg = ast.Name(str(count), _span(count)) if count.type == "NAME" else ast.Num(float(count), _span(count))
        return ast.Block("repeat", arg, self._block_body(items), _span(meta))

    def every_block(self, meta, children):
        period, *items = children
        self._no_group_statement(items, "an 'every' block")
        return ast.Block("every", period, self._block_body(items), _span(meta))

    def axis_block(self, meta, children):
        word, var, *items = children
        if word != "axis":
            raise SpecError(f"'for {word} {var}' is not a loop", _span(word),
                            hint=f"the loop over the axes of p is 'for axis {var} {{'")
        self._no_group_statement(items, "a 'for axis' loop")
        return ast.Block("axis", ast.Name(str(var), _span(var)), self._block_body(items), _span(meta))

    def rule_block(self, meta, children):
        cond, *items = children
        self._no_group_statement(items, "a rule (group statements are not supported with rules yet)")
        states, body = [], []
        for item in items:
            if isinstance(item, (ast.Assign, ast.Block)):
                body.append(item)
                continue
            if body:
                raise SpecError("'state' declaration after the rule's first statement", item[1][0].span,
                                hint="declare the rule's states at the top of its block")
            states.extend(item[1])
        return ast.Rule(cond, tuple(states), tuple(body), _span(meta))

    def rule_refuse(self, meta, children):
        cond, *texts = children
        return ast.Rule(cond, (), (), _span(meta), refuse="".join(str(t)[1:-1] for t in texts))

    def mode_block(self, meta, children):
        word, name, *items = children
        if word != "on":
            raise SpecError(f"'{word} {name} {{' is not a block", _span(word),
                            hint="a mode block is 'on eval {' or 'on train {'")
        self._no_group_statement(items, f"'on {name}'")
        return ast.Mode(str(name), self._block_body(items), _span(meta), _span(name))

    def input_item(self, meta, children):
        name, default = children
        return ast.Input(str(name), default.value, _span(name))

    def input_decl(self, meta, children):
        return ("input", children)

    def start(self, meta, children):
        (_, name, doc, name_span), *items = children
        decls = {"hyper": [], "state": [], "input": []}
        body, rules, modes = [], [], []
        for item in items:
            if isinstance(item, ast.Mode):
                modes.append(item)
                continue
            if isinstance(item, ast.Rule):
                if body:
                    raise SpecError("a spec with rules has its statements inside them", body[0].span,
                                    hint="move the statements into the 'rule' blocks")
                rules.append(item)
                continue
            if isinstance(item, (ast.Assign, ast.Block)):
                if rules:
                    raise SpecError("a statement after a 'rule' block", item.span,
                                    hint="with rules, every statement belongs to a rule")
                if isinstance(item, ast.Assign) and item.group and body and not getattr(body[-1], "group", False):
                    raise SpecError("a group statement after a per-parameter statement", item.span,
                                    hint="group statements run before any parameter is updated: move every "
                                         "'group NAME = ...' line above the first per-parameter statement")
                body.append(item)
                continue
            kind, found = item
            if body or rules:
                raise SpecError(f"'{kind}' declaration after the first statement", found[0].span,
                                hint="move every 'hyper', 'state' and 'input' line above the first statement "
                                     "(a rule's own states go at the top of its block)")
            decls[kind].extend(found)
        if rules and decls["state"]:
            raise SpecError("with rules, states are declared inside each rule", decls["state"][0].span,
                            hint="move the 'state' line into the rules that use it")
        hypers = tuple(d for d in decls["hyper"] if isinstance(d, ast.Hyper))
        tuples = tuple(d for d in decls["hyper"] if isinstance(d, ast.HyperTuple))
        if modes and rules:
            raise SpecError("mode blocks are not supported with rules yet", modes[0].span,
                            hint="write the spec without rules, or without 'on eval'/'on train'")
        counts = {b.arg.id for b in _blocks(list(body) + [i for r in rules for i in r.body])
                  if b.kind == "repeat" and isinstance(b.arg, ast.Name)}
        hypers = tuple(replace(h, count=True) if h.name in counts else h for h in hypers)
        return ast.Spec(name, doc, hypers, tuple(decls["state"]), tuple(body), name_span, tuples,
                        tuple(rules), tuple(decls["input"]), tuple(modes))


def _blocks(body):
    """Every block of a body, nested ones included."""
    for item in body:
        if isinstance(item, ast.Block):
            yield item
            yield from _blocks(item.body)


# Labelled bad inputs: Lark matches a failing parse against these to pick the message.
# Each label is "message | what to do".
_EXAMPLES = {
    "a spec starts with 'optimizer NAME' | put 'optimizer MyName' on the first line that is not blank or a comment": [
        "hyper lr = 1", "p -= g", "state m", "\nhyper lr = 1", "\np -= g", "\nstate m",
    ],
    "expected an expression after the operator | finish the expression, or continue it inside parentheses to span lines": [
        "optimizer X\np -= g *\n", "optimizer X\np -= g +\n", "optimizer X\np -= \n",
        "optimizer X\np -= g ^\n", "optimizer X\np -= g / ;", "optimizer X\np -= g -\n", "optimizer X\np -= g /\n",
        "optimizer X\np -= g <\n", "optimizer X\np -= -\n", "optimizer X\np -= f(g, )\n",
    ],
    "comparisons do not chain | write 'a < b < c' as two comparisons, e.g. (a < b) * (b < c)": [
        "optimizer X\nx = a < b < c\n", "optimizer X\nx = a == b != c\n",
    ],
    "unclosed parenthesis | add the missing ')'": [
        "optimizer X\np -= (g", "optimizer X\np -= sqrt(g", "optimizer X\np -= f(g, (a)",
    ],
    "a hyperparameter needs a default value | write it as 'hyper NAME = NUMBER [in RANGE]'": [
        "optimizer X\nhyper lr\n", "optimizer X\nhyper lr, b\n", "optimizer X\nhyper lr =\n",
    ],
    "a hyperparameter default must be a number | defaults are literal numbers such as 1e-3, .5 or inf, "
    "or True/False for a flag": [
        "optimizer X\nhyper lr = a\n", "optimizer X\nhyper lr = 1 + 2\n", "optimizer X\nhyper lr = (1)\n",
    ],
    "a tuple keyword groups declared hyperparameters | write it as 'hyper betas = (b1, b2)', "
    "each of b1, b2 declared with its own 'hyper' line": [
        "optimizer X\nhyper betas = (b1)\n", "optimizer X\nhyper betas = (b1,)\n",
        "optimizer X\nhyper betas = (b1 = 1, b2 = 2)\n", "optimizer X\nhyper betas = (b1, 2)\n",
    ],
    "'as' names a keyword | write 'hyper wd = 0 as weight_decay' or 'state m as exp_avg'": [
        "optimizer X\nhyper wd = 0 as\n", "optimizer X\nhyper wd = 0 as 1\n", "optimizer X\nstate m as\n",
        "optimizer X\nstate m = p as\n",
    ],
    "malformed range | write a range as [lo, hi], [lo, hi), (lo, hi] or (lo, hi) with number bounds (inf allowed)": [
        "optimizer X\nhyper lr = 1 in [0]\n", "optimizer X\nhyper lr = 1 in [0 1]\n",
        "optimizer X\nhyper lr = 1 in 0, 1\n", "optimizer X\nhyper lr = 1 in [a, 1]\n",
        "optimizer X\nhyper lr = 1 in [0, 1\n",
    ],
    "malformed statement | a statement is NAME = EXPR, or NAME += EXPR (also -=, *=, /=)": [
        "optimizer X\np g\n", "optimizer X\np\n", "optimizer X\n3 = p\n", "optimizer X\np - = g\n",
        "optimizer X\n(p) = g\n",
    ],
    "two statements run together | end each statement with a newline or ';'": [
        "optimizer X\np -= g m = g\n", "optimizer X\np -= g state m\n", "optimizer X\nhyper a = 1 b = 2\n",
        "optimizer X\np -= f(g) m = g\n", "optimizer X\np -= 2 m = g\n", "optimizer X\nhyper a = 1 in [0, 1] b = 2\n",
        "optimizer X\nstate m = 1 v\n",
    ],
    "a block's statements go on their own lines | put a line break after '{', and '}' on a line of its own": [
        "optimizer X\nrepeat 3 { p -= g }\n", "optimizer X\nrule { p -= g }\n", "optimizer X\nevery 2 { p -= g }\n",
        "optimizer X\nrule {\np -= g }\n", "optimizer X\nrepeat 2 {\np -= g }\n",
        "optimizer X\nrule {\nstate m }\n",
    ],
    "unclosed block | close the block with '}' on a line of its own": [
        "optimizer X\nrule {\np -= g\n", "optimizer X\nrepeat 2 {\np -= g\n", "optimizer X\nrule {\n",
        "optimizer X\nrule ndim > 1 {\nstate m\n",
    ],
    ("a state list sized by a number or a hyperparameter (AggMo's K momenta) is not in the language | "
     "declare one state and one hyperparameter per member (state m1, m2, m3 and hyper b1 = 0, b2 = 0.9, "
     "b3 = 0.99), then write each update out"): [
        "optimizer X\nstate m[3]\n", "optimizer X\nstate m[k]\n", "optimizer X\nstate m, v[k]\n",
        "optimizer X\nstate m[k] = 0\n",
    ],
    "a string is allowed only after 'optimizer NAME', as a named choice or after 'refuse' | strings are "
    "docstrings, choices (hyper mode = \"a\" | \"b\") and reasons (rule ndim >= 3 refuse \"why\"); remove the quotes": [
        'optimizer X\np -= "g"\n', 'optimizer X\nhyper a = "1"\n',
    ],
}


# Operators and words of other languages, and what to write instead (checked before the labels
# above: `g and m` would otherwise read as two statements run together).
_FOREIGN = {
    "and": "multiply the conditions: (a > 0) * (b > 0) is 1 where both hold",
    "&&": "multiply the conditions: (a > 0) * (b > 0) is 1 where both hold",
    "&": "multiply the conditions: (a > 0) * (b > 0) is 1 where both hold",
    "or": "take the larger: max(a > 0, b > 0) is 1 where either holds",
    "||": "take the larger: max(a > 0, b > 0) is 1 where either holds",
    "|": "take the larger: max(a > 0, b > 0) is 1 where either holds",
    "not": "subtract from 1: 1 - (a > 0), or write the opposite comparison (a <= 0)",
    "!": "'!=' compares; for 'not c' write 1 - c",
    "if": "write where(c, a, b): a where c is non-zero, else b",
    "else": "write where(c, a, b): a where c is non-zero, else b",
    "@": "write mm(a, b) for the matrix product",
    "//": "there is no integer division: write a / b, or a % b for the remainder",
    ".": "call functions as f(x), not as methods: sum(x), not x.sum()",
}
_FOREIGN_CHARS = re.compile(r"&&|\|\||//|!(?!=)|[&|@.]")
# Tokens the LALR tables accept after an expression only in a declaration or a block's header;
# a hint inside an expression never offers them.
_DECLARATION_TOKENS = {"EAGER": "state", "ONLY": "hyper", "_AS": "hyper state", "AS": "hyper state",
                       "IN": "hyper", "LBRACE": "rule repeat every", "COLON": "state",
                       # a condition's state is shared (LALR): 'else' ends a state list's, refuse a rule's
                       "ELSE": "state", "REFUSE": "rule"}


def _foreign(err: UnexpectedInput, text: str) -> SpecError | None:
    """A word or operator of another language where an expression goes on: what to write instead."""
    if isinstance(err, UnexpectedCharacters):
        m = _FOREIGN_CHARS.match(text, err.pos_in_stream)
        if not m or (m.group() == "." and text[err.pos_in_stream + 1:err.pos_in_stream + 2].isdigit()):
            return None
        what, line, column = m.group(), err.line, err.column
    elif isinstance(err, UnexpectedToken) and str(err.token) in _FOREIGN and err.token.type != "STRING":
        # (and/or are words of a rule's condition, '|' of a choice list, not operators of a statement)
        what, line, column = str(err.token), err.token.line, err.token.column
        longer = _FOREIGN_CHARS.match(text, err.token.start_pos or 0)
        if longer and len(longer.group()) > len(what):  # '||' read as '|' then '|'
            what = longer.group()
    elif isinstance(err, UnexpectedToken) and err.token.start_pos is not None:
        # `x // y`, `g * not m`: the foreign word was read as an operand or an operator; the
        # token after it is the one that failed
        pos, line = err.token.start_pos, err.token.line
        before = text[text.rfind("\n", 0, pos) + 1:pos]
        if str(err.token) == "/" and before.endswith("/"):
            before += "/"
        m = re.search(r"(?:\b(not|and|or|if|else)\s*|(//))$", before)
        if not m:
            return None
        what = m.group(1) or "//"
        column = m.start() + 1
    else:
        return None
    return SpecError(f"syntax error: '{what}' is not an operator of optdsl", Span(line, column, line, column + len(what)),
                     hint=_FOREIGN[what], source=text)


def _fits_line(token: str, text: str, pos: int) -> bool:
    """Whether an expected token belongs on the line where the error is (not a declaration's word
    or a block's '{' in the middle of an expression, nor ',' outside brackets and lists)."""
    start = text.rfind("\n", 0, pos) + 1
    first = (text[start:pos].split() or [""])[0]
    if token in _DECLARATION_TOKENS:
        return first in _DECLARATION_TOKENS[token].split()
    if token == "COMMA":
        return first in ("hyper", "state", "input") or _unclosed(text[start:pos], pos - start) is not None
    if token in ("RPAR", "RSQB"):  # a range closes with either
        return _unclosed(text[start:pos], pos - start) is not None
    return True


@functools.cache
def _example_errors() -> tuple:
    found = []
    for label, examples in _EXAMPLES.items():
        for example in examples:
            try:
                parser().parse(example)
            except UnexpectedInput as ut:
                found.append((label, ut))
    return tuple(found)


def _match_label(err: UnexpectedInput) -> str | None:
    """Like Lark's match_examples, but compares the LALR state only, not the stack depth
    (which differs between the first and a later statement, or inside parentheses)."""
    def key(state):
        return getattr(state, "position", state)
    fallback = None
    for label, ut in _example_errors():
        if type(ut) is not type(err) or key(ut.state) != key(err.state):
            continue
        if isinstance(err, UnexpectedToken) and ut.accepts != err.accepts:
            continue
        if isinstance(err, UnexpectedToken) and ut.token.type == err.token.type:
            return label
        fallback = fallback or label
    return fallback


def _unclosed(text: str, end: int) -> tuple[int, int, str] | None:
    """The innermost ( or [ still open before offset `end`: (line, column, char)."""
    stack, line, col, i = [], 1, 1, 0
    while i < min(end, len(text)):
        c = text[i]
        if c in "#\"":  # skip a comment, or a string up to its closing quote, within the line
            stop = text.find("\n", i)
            stop = len(text) if stop < 0 else stop
            close = text.find('"', i + 1, stop) if c == '"' else -1
            stop = close + 1 if close >= 0 else stop
            col, i = col + stop - i, stop
            continue
        if c in "([":
            stack.append((line, col, c))
        elif c in ")]" and stack:
            stack.pop()
        line, col = (line + 1, 1) if c == "\n" else (line, col + 1)
        i += 1
    return stack[-1] if stack else None


def _syntax_error(err: UnexpectedInput, text: str) -> SpecError:
    foreign = _foreign(err, text)
    if foreign is not None:
        return foreign
    label = None
    try:
        label = _match_label(err)
    except Exception:  # matching is best effort: never hide the real error behind it
        label = None
    if label is None and isinstance(err, UnexpectedToken) and "_NL" in err.accepts and (
            str(err.token) in ("hyper", "state") or err.token.type == "NAME" and re.match(
                r"\s*[-+*/]?=(?!=)", text[err.token.end_pos:])):  # a statement could end here; one begins
        label = next(k for k in _EXAMPLES if k.startswith("two statements"))
    if isinstance(err, UnexpectedToken) and err.token.type == "STRING":
        label = next(k for k in _EXAMPLES if k.startswith("a string is allowed"))
        if text[text.rfind("\n", 0, err.token.start_pos) + 1:err.token.start_pos].split()[:1] == ["rule"]:
            label = ("a refusing rule is 'rule COND refuse \"why\"' | name the parameters it refuses, e.g. "
                     "'rule ndim >= 3 refuse \"why\"'")
    label, _, label_hint = (label or "").partition(" | ")
    # A missing ')' or ']' lets the next lines run on into this one: point at the opener.
    tok = getattr(err, "token", None)
    at_eof = isinstance(err, UnexpectedEOF) or (tok is not None and tok.type == "$END")
    pos = len(text) if at_eof else getattr(tok, "start_pos", None)
    if isinstance(err, UnexpectedToken) and pos is not None and (at_eof or tok.type not in ("RPAR", "RSQB")):
        opener = _unclosed(text, pos)
        first_on_line = at_eof or not text[text.rfind("\n", 0, pos) + 1:pos].strip()
        if opener and first_on_line and (at_eof or opener[0] < tok.line):
            line, column, char = opener
            what, fix = ("parenthesis", "add the missing ')'") if char == "(" else (
                "range bracket", "close the range with ']' or ')'")
            return SpecError(f"syntax error: unclosed {what}", Span(line, column, line, column + 1),
                             hint=f"{fix} (inside brackets a line runs on into the next, "
                                  "so what follows was read as part of it)", source=text)
    if isinstance(err, UnexpectedCharacters) and not text[err.pos_in_stream:err.pos_in_stream + 1] == '"':
        got = repr(text[err.pos_in_stream]) if err.pos_in_stream < len(text) else "end of file"
        label, label_hint = "", ""
        message = f"unexpected character {got}"
    elif isinstance(err, UnexpectedCharacters):  # a '"' that no STRING matched
        message = label = "unterminated string"
        label_hint = "close the string with '\"' on the same line" + (
            "" if "STRING" in (err.allowed or ()) else "; strings are allowed only after 'optimizer NAME'")
    elif isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        message = label or "the spec ended in the middle of a statement"
    else:
        tok = err.token
        shown = "end of line" if tok.type == "_NL" else repr(str(tok))
        message = label or f"unexpected {shown}"
    expected = sorted(getattr(err, "expected", None) or getattr(err, "allowed", None) or [])
    hint = label_hint or "check the line against docs/language.md"
    pos = getattr(err, "pos_in_stream", None)
    if pos is None and getattr(err, "token", None) is not None:
        pos = getattr(err.token, "start_pos", None)
    if pos is not None:
        expected = [t for t in expected if _fits_line(t, text, min(pos, len(text)))]
    if expected and not label:
        hint = "expected one of: " + ", ".join(_pretty(t) for t in expected[:8])
    line = getattr(err, "line", 0) or text.count("\n") + 1
    column = getattr(err, "column", 0) or 1
    if line < 1:
        line, column = text.count("\n") + 1, len(text.rsplit("\n", 1)[-1]) + 1
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        # `p m`: two names parse as the start of `group NAME = ...` or `on NAME {`; the second is wrong
        before = text[text.rfind("\n", 0, err.token.start_pos) + 1:err.token.start_pos]
        two = re.fullmatch(r"(\s*([A-Za-z_]\w*)\s+)[A-Za-z_]\w*\s*", before)
        if two and two.group(2) not in ("group", "on", "optimizer", "hyper", "state", "input", "rule", "repeat",
                                        "every"):
            column = len(two.group(1)) + 1
    return SpecError(f"syntax error: {message}", Span(line, column, line, column + 1), hint=hint,
                     source=text)  # the whole line and a caret, as every other error shows it


_TOKEN_NAMES = {"_NL": "end of line", "SEMICOLON": "';'", "NAME": "a name", "NUMBER": "a number",
                "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','",
                "EQUAL": "'='", "MINUS": "'-'", "PLUS": "'+'", "STAR": "'*'", "SLASH": "'/'",
                "INF": "'inf'", "STRING": "a string", "AUG_OP": "'+=', '-=', '*=' or '/='",
                "COMPARE": "a comparison", "POW_OP": "'^'", "IN": "'in'", "$END": "end of file",
                "LBRACE": "'{'", "RBRACE": "'}'"}


def _pretty(name: str) -> str:
    return _TOKEN_NAMES.get(name, name.lower())


MAX_NAME = 100  # characters of one name; a 100,000-character hyperparameter made a 2 MB module in 5 s
# Characters of a spec, comments included: parsing, lowering and the checks are linear in it, but at
# about 10 s a megabyte (a 1 MB sum took 9 s to be refused as nested too deeply, 120 lines of 64 kB in
# all 1.6 s to compile). kron.opt, the largest shipped spec, is 8.6 kB.
MAX_SPEC_CHARS = 32 * 1024

# Embeddings, overrides, isolates and marks of the Unicode bidirectional algorithm, as rustc refuses them
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def parse(text: str, filename: str = "<spec>") -> ast.Spec:
    """Parse spec text into the AST. Raises SpecError (never a Lark or Python error)."""
    # not even in a comment or a string; C1's controls too (U+009B is a terminal's CSI), but U+0085,
    # a line break to str.splitlines() that a comment may hold
    bad = re.search(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x84\x86-\x9f]", text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise SpecError(f"syntax error: unexpected character {bad.group()!r}", Span(line, column, line, column + 1),
                        hint="remove the control character", filename=filename, source=text)
    if len(text) > MAX_SPEC_CHARS:
        line = text.count("\n", 0, MAX_SPEC_CHARS) + 1
        column = MAX_SPEC_CHARS - text.rfind("\n", 0, MAX_SPEC_CHARS)
        raise SpecError(f"the spec is {len(text):,} characters long; at most {MAX_SPEC_CHARS:,} compile in "
                        "bounded time (the limit is passed here)", Span(line, column, line, column + 1),
                        filename=filename, source=text,
                        hint="a spec is a page of math (the largest shipped one is 8.6 kB): move long prose "
                             "to a separate file, split a long spec into several")
    bidi = _BIDI.search(text)  # in a comment or a docstring too
    if bidi:
        line = text.count("\n", 0, bidi.start()) + 1
        column = bidi.start() - text.rfind("\n", 0, bidi.start())
        raise SpecError(f"a bidirectional control character ({bidi.group()!r}) in the spec",
                        Span(line, column, line, column + 1), filename=filename, source=text,
                        hint="remove it: it makes an editor show the text in another order than optdsl "
                             "reads it (Trojan Source, CVE-2021-42574); right-to-left words need no control "
                             "characters")
    try:
        tree = parser().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text).located(filename, text) from None
    for tok in tree.scan_values(lambda v: isinstance(v, Token) and v.type == "NAME" and len(v) > MAX_NAME):
        raise SpecError(f"a name of {len(tok)} characters (at most {MAX_NAME})", Span(
            tok.line, tok.column, tok.line, tok.column + len(tok)), filename=filename, source=text,
            hint="shorten it: a name this long made a module of megabytes and a compile of seconds")
    try:
        spec = _ToAst().transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc.located(filename, text) from None
        raise
    try:
        return axes.expand(spec)  # state lists and `for axis` loops, unrolled per rank (a stage of its own)
    except SpecError as err:
        raise err.located(filename, text) from None
