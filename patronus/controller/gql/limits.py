"""Limits on what one GraphQL document may ask for, checked before anything runs.

- tokens: at most :data:`MAX_TOKENS` lexical tokens (counted before parsing;
  strawberry's ``MaxTokensLimiter`` is the parser's backstop);
- depth: at most :data:`MAX_DEPTH` nested selection levels
  (``{ sites { paths { latest { rttMs } } } }`` is 4);
- aliases: at most :data:`MAX_ALIASES` aliased fields;
- complexity: at most :data:`MAX_COMPLEXITY`, where every field costs 1 and
  a list multiplies the cost of what it selects by its size: the ``first``
  argument when the field has one (a page), :data:`DEFAULT_LIST` for a list
  without (the list inside a page is the page, not counted again);
- page size: ``first`` from 1 to :data:`MAX_PAGE`.

A refused document gets one error per limit, naming it and the numbers
(``query depth 14 exceeds the limit 10``), with ``extensions`` ``{"code":
"LIMIT_EXCEEDED", "limit": "depth", "value": 14, "max": 10}``. Fields of
introspection (``__schema``, ``__type``) are not counted: the schema bounds them.
Fragments are walked once each (memoised), so nesting fragments cannot
make the check itself expensive.

>>> from graphql import parse
>>> query_depth(parse("{ a { b { c } } d }"))
3
>>> alias_count(parse("{ x: a y: a { z: b } }"))
3
>>> token_count("{ a(first: 2) { b } }")
11
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    Source,
    TokenKind,
    ValidationContext,
    ValidationRule,
    VariableNode,
)
from graphql.language.lexer import Lexer
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import SchemaExtension

__all__ = ["MAX_TOKENS", "MAX_DEPTH", "MAX_ALIASES", "MAX_COMPLEXITY", "MAX_PAGE", "DEFAULT_LIST", "Limits",
           "limit_error", "query_depth", "alias_count", "token_count", "query_cost", "check_page"]

MAX_TOKENS = 5000
MAX_DEPTH = 10
MAX_ALIASES = 30
MAX_COMPLEXITY = 50_000
MAX_PAGE = 1000
DEFAULT_LIST = 10


def limit_error(limit: str, value: int, maximum: int, what: str | None = None, nodes: Any = None) -> GraphQLError:
    """The error of a refused document: which limit, the value, the limit's value."""
    verb = "exceed" if (what or "").endswith(("s", "than")) else "exceeds"
    msg = f"{what or 'query ' + limit} {value} {verb} the limit {maximum}"
    return GraphQLError(msg, nodes, extensions={"code": "LIMIT_EXCEEDED", "limit": limit, "value": value,
                                                 "max": maximum})


def check_page(first: Any, *, maximum: int = MAX_PAGE) -> int:
    """``first`` as a page size: GraphQLError (limit ``page``) outside 1..maximum."""
    if isinstance(first, bool) or not isinstance(first, int):
        raise GraphQLError(f"first: {first!r} is not an integer", extensions={"code": "BAD_USER_INPUT",
                                                                              "field": "first"})
    if first > maximum:
        raise limit_error("page", first, maximum, "page size first:")
    if first < 1:
        raise GraphQLError(f"page size first: {first} is below 1", extensions={
            "code": "LIMIT_EXCEEDED", "limit": "page", "value": first, "min": 1, "max": maximum})
    return first


# -- pure measures of a document ----------------------------------------------------------------


def token_count(text: str, stop: int | None = None) -> int:
    """Lexical tokens of ``text`` (as graphql-core's parser counts them, comments
    not counted); stops counting after ``stop``. A lexing error ends the count
    (the parser reports it)."""
    lexer = Lexer(Source(text))
    n = 0
    try:
        while True:
            tok = lexer.advance()
            if tok.kind == TokenKind.EOF:
                return n
            n += 1
            if stop is not None and n > stop:
                return n
    except GraphQLError:
        return n


def _fragments(document: Any) -> dict[str, FragmentDefinitionNode]:
    return {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}


def _operations(document: Any, operation_name: str | None = None) -> Iterator[OperationDefinitionNode]:
    for d in document.definitions:
        if isinstance(d, OperationDefinitionNode) and (operation_name is None or
                                                       (d.name is not None and d.name.value == operation_name)):
            yield d


def query_depth(document: Any, operation_name: str | None = None) -> int:
    """The deepest nesting of fields of the document's operations (a leaf field is 1)."""
    frags = _fragments(document)
    memo: dict[str, int] = {}

    def sel(selection_set: Any, visiting: frozenset[str]) -> int:
        best = 0
        for s in selection_set.selections if selection_set else ():
            if isinstance(s, FieldNode):
                if s.name.value.startswith("__"):
                    continue
                best = max(best, 1 + sel(s.selection_set, visiting))
            elif isinstance(s, InlineFragmentNode):
                best = max(best, sel(s.selection_set, visiting))
            elif isinstance(s, FragmentSpreadNode):
                name = s.name.value
                if name in visiting or name not in frags:
                    continue
                if name not in memo:
                    memo[name] = sel(frags[name].selection_set, visiting | {name})
                best = max(best, memo[name])
        return best

    return max((sel(op.selection_set, frozenset()) for op in _operations(document, operation_name)), default=0)


def alias_count(document: Any) -> int:
    """Aliased fields in the operations, a fragment counted each time it is spread."""
    frags = _fragments(document)
    memo: dict[str, int] = {}

    def sel(selection_set: Any, visiting: frozenset[str]) -> int:
        n = 0
        for s in selection_set.selections if selection_set else ():
            if isinstance(s, FieldNode):
                n += (s.alias is not None) + sel(s.selection_set, visiting)
            elif isinstance(s, InlineFragmentNode):
                n += sel(s.selection_set, visiting)
            elif isinstance(s, FragmentSpreadNode):
                name = s.name.value
                if name in visiting or name not in frags:
                    continue
                if name not in memo:
                    memo[name] = sel(frags[name].selection_set, visiting | {name})
                n += memo[name]
        return n

    return sum(sel(op.selection_set, frozenset()) for op in _operations(document))


def _unwrap(t: Any) -> tuple[Any, bool]:
    is_list = False
    while isinstance(t, (GraphQLNonNull, GraphQLList)):
        if isinstance(t, GraphQLList):
            is_list = True
        t = t.of_type
    return t, is_list


def _arg_default(arg_def: Any) -> Any:
    """An argument's default value (graphql-core keeps it as a value or, from SDL, as a literal)."""
    v = arg_def.default_value
    if isinstance(v, int):
        return v
    d = getattr(arg_def, "default", None)
    if d is not None:
        if isinstance(getattr(d, "value", None), int):
            return d.value
        if isinstance(getattr(d, "literal", None), IntValueNode):
            return int(d.literal.value)
    return None


def query_cost(document: Any, schema: GraphQLSchema, variables: dict[str, Any] | None = None, *,
               default_list: int = DEFAULT_LIST, max_page: int = MAX_PAGE,
               operation_name: str | None = None) -> tuple[int, list[tuple[int, Any]]]:
    """The complexity of the document's operations and the ``first`` values
    over ``max_page`` (or below 1) with their nodes.

    Every field costs 1 plus what it selects times its multiplier: ``first``
    (a literal, a variable, or the argument's default) for a field that takes
    one, ``default_list`` for a list field without (1 for the list directly
    inside a page), 1 otherwise. Unknown fields cost 1 (validation reports them)."""
    variables = variables or {}
    frags = _fragments(document)
    bad_pages: list[tuple[int, Any]] = []
    memo: dict[tuple[str, str, bool], int] = {}

    def first_of(node: FieldNode, field_def: Any) -> int | None:
        arg_def = field_def.args.get("first") if field_def is not None else None
        if arg_def is None:
            return None
        for a in node.arguments or ():
            if a.name.value == "first":
                v = a.value
                if isinstance(v, IntValueNode):
                    n = int(v.value)
                elif isinstance(v, VariableNode):
                    n = variables.get(v.name.value)
                    if n is None:
                        n = _arg_default(arg_def)
                else:
                    return default_list   # validation reports a value of the wrong type
                break
        else:
            n = _arg_default(arg_def)
        if isinstance(n, bool) or not isinstance(n, int):
            return default_list
        if n > max_page or n < 1:
            bad_pages.append((n, node))
        return max(1, min(n, max_page))

    def sel(selection_set: Any, parent: Any, in_page: bool, visiting: frozenset[str]) -> int:
        cost = 0
        for s in selection_set.selections if selection_set else ():
            if isinstance(s, FieldNode):
                name = s.name.value
                if name.startswith("__"):
                    continue
                fields = getattr(parent, "fields", None) or {}
                field_def = fields.get(name)
                if field_def is None:
                    cost += 1
                    continue
                child, is_list = _unwrap(field_def.type)
                page = first_of(s, field_def)
                if page is not None:
                    mult, child_in_page = page, True
                elif is_list:
                    mult, child_in_page = (1 if in_page else default_list), False
                else:
                    mult, child_in_page = 1, False
                cost += 1 + (mult * sel(s.selection_set, child, child_in_page, visiting) if s.selection_set else 0)
            elif isinstance(s, InlineFragmentNode):
                t = schema.get_type(s.type_condition.name.value) if s.type_condition else parent
                cost += sel(s.selection_set, t or parent, in_page, visiting)
            elif isinstance(s, FragmentSpreadNode):
                fname = s.name.value
                frag = frags.get(fname)
                if frag is None or fname in visiting:
                    continue
                t = schema.get_type(frag.type_condition.name.value) or parent
                key = (fname, getattr(t, "name", ""), in_page)
                if key not in memo:
                    memo[key] = sel(frag.selection_set, t, in_page, visiting | {fname})
                cost += memo[key]
        return cost

    roots = {OperationType.QUERY: schema.query_type, OperationType.MUTATION: schema.mutation_type,
             OperationType.SUBSCRIPTION: schema.subscription_type}
    total = 0
    for op in _operations(document, operation_name):
        root = roots.get(op.operation)
        if isinstance(root, GraphQLObjectType):
            total += sel(op.selection_set, root, False, frozenset())
    return total, bad_pages


# -- the extension ------------------------------------------------------------------------------


def _rules(variables: dict[str, Any] | None, operation_name: str | None, ext: Limits) -> list[type[ValidationRule]]:
    class DocumentLimits(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            doc = context.document
            depth = query_depth(doc, operation_name)
            if depth > ext.max_depth:
                context.report_error(limit_error("depth", depth, ext.max_depth))
            aliases = alias_count(doc)
            if aliases > ext.max_aliases:
                context.report_error(limit_error("aliases", aliases, ext.max_aliases, "aliases"))
            cost, bad = query_cost(doc, context.schema, variables, default_list=ext.default_list,
                                   max_page=ext.max_page, operation_name=operation_name)
            ext.cost = cost
            for n, node in bad[:5]:
                if n > ext.max_page:
                    context.report_error(limit_error("page", n, ext.max_page, "page size first:", [node]))
                else:
                    context.report_error(GraphQLError(
                        f"page size first: {n} is below 1", [node],
                        extensions={"code": "LIMIT_EXCEEDED", "limit": "page", "value": n, "min": 1,
                                    "max": ext.max_page}))
            if cost > ext.max_complexity:
                context.report_error(limit_error("complexity", cost, ext.max_complexity))

    rules: list[type[ValidationRule]] = [DocumentLimits]
    if not ext.introspection:
        rules.append(NoSchemaIntrospectionCustomRule)
    return rules


class Limits(SchemaExtension):
    """Tokens, depth, aliases, complexity, page size and (optionally) no
    introspection; one instance per operation (pass :meth:`factory`)."""

    def __init__(self, *, max_tokens: int = MAX_TOKENS, max_depth: int = MAX_DEPTH,
                 max_aliases: int = MAX_ALIASES, max_complexity: int = MAX_COMPLEXITY, max_page: int = MAX_PAGE,
                 default_list: int = DEFAULT_LIST, introspection: bool = True) -> None:
        self.max_tokens, self.max_depth, self.max_aliases = max_tokens, max_depth, max_aliases
        self.max_complexity, self.max_page, self.default_list = max_complexity, max_page, default_list
        self.introspection = introspection
        self.cost: int | None = None

    @classmethod
    def factory(cls, **kw: Any) -> Any:
        return lambda: cls(**kw)

    def on_operation(self) -> Iterator[None]:
        ec = self.execution_context
        if ec.query is not None:
            n = token_count(ec.query, stop=10 * self.max_tokens)
            if n > self.max_tokens:   # counting stops at 10x the limit: "more than" that
                what = "query tokens" if n <= 10 * self.max_tokens else "query tokens: more than"
                raise limit_error("tokens", min(n, 10 * self.max_tokens), self.max_tokens, what)
        ec.validation_rules = ec.validation_rules + tuple(_rules(ec.variables, ec.operation_name, self))
        yield

    def get_results(self) -> dict[str, Any]:
        ctx = self.execution_context.context
        out: dict[str, Any] = {}
        if self.cost is not None:
            out["complexity"] = self.cost
        n = getattr(ctx, "store_queries", None)
        if isinstance(n, int):
            out["storeQueries"] = n
        return {"patronus": out} if out else {}
