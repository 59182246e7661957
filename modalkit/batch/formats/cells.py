"""Text cells (CSV) filled into the pipeline's input model, as a user means them.

A CSV cell is always text, and an empty cell cannot say whether it means "nothing" or "an empty string". What a
cell becomes is decided from the input model's field annotations, once per chunk (never per record):

- an empty cell is None for a field that accepts None (``Optional[int]``, ``str | None``), the field's default
  for a field that has one, and otherwise stays ``""``: a required ``str`` field gets the empty string (a valid
  string, and the only way a CSV writer can write one; declare ``Field(min_length=1)`` to refuse it), a required
  number fails validation naming its field;
- a cell of a structured field (a nested model, a list, tuple, set or dict, or an optional one) is parsed as JSON,
  so ``{"city": "Lyon"}`` fills a nested model and ``["tea", "cup"]`` a list; a cell that is not JSON fails
  validation naming the field and why;
- every other cell stays text, which pydantic converts (``"3"`` to 3, ``"true"`` to True); a ``str`` field whose
  cell looks like JSON keeps its text;
- the id field's cell becomes an integer when the model declares the id an ``int`` (as the same record in JSONL
  would have it), and an empty one is no id.

Example:
    >>> from pydantic import BaseModel
    >>> class Order(BaseModel):
    ...     order_id: int
    ...     qty: int | None = None
    ...     tags: list[str] = []
    >>> cells = RowFitter(Order, ("order_id", "qty", "tags"), "order_id")
    >>> cells.fit({"order_id": "7", "qty": "", "tags": '["a"]'})
    {'order_id': 7, 'qty': None, 'tags': ['a']}
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
import typing
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel

__all__ = ["RowFitter"]

#: An empty cell whose field has a default: the key is dropped, so that the default applies.
_DEFAULT = object()

_STRUCTURED_ORIGINS = (
    list,
    tuple,
    set,
    frozenset,
    dict,
    collections.deque,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.MutableSet,
    collections.abc.Mapping,
    collections.abc.MutableMapping,
)


class _Field(NamedTuple):
    """What a field's annotation says about the text cells that fill it."""

    empty: Any  # what an empty cell becomes: None, _DEFAULT, or "" (kept)
    structured: bool  # a cell holds JSON
    integer: bool  # an int and nothing else (besides None)


class RowFitter:
    """Fits the rows of one CSV chunk (dicts of column -> text) to ``model``'s fields before validation.

    Args:
        model: The pipeline's input model.
        header: The chunk's column names; columns that name no field are left as they are.
        id_field: The job's id field, or None.
    """

    def __init__(self, model: type[BaseModel], header: tuple[str, ...], id_field: str | None) -> None:
        fields = _fields(model)
        columns = [(column, fields[column]) for column in header if column in fields]
        self._empties = tuple((column, f.empty) for column, f in columns if f.empty != "")
        self._json = tuple(column for column, f in columns if f.structured)
        self._id: str | None = None
        self._id_integer = False
        if id_field is not None and id_field in header:
            self._id = id_field
            self._id_integer = id_field in fields and fields[id_field].integer

    @property
    def needed(self) -> bool:
        """Whether any cell of this chunk's rows may need fitting (a model of required strings needs none)."""
        return bool(self._empties or self._json or self._id)

    def fit(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` fitted in place (and returned): empty cells, JSON cells, the id."""
        id_column = self._id
        if id_column is not None:
            text = row[id_column]
            if not text:
                row[id_column] = None  # an empty id cell is no id (the id policy says so, naming the field)
            elif self._id_integer:
                try:  # noqa: SIM105 - a context manager per record is a cost per record
                    row[id_column] = int(text)
                except ValueError:
                    pass  # not an integer: validation names the field
        if "" in row.values():  # one scan in C; most rows of most files have no empty cell
            for column, empty in self._empties:
                if row[column] == "":
                    if empty is _DEFAULT:
                        del row[column]
                    else:
                        row[column] = empty
        loads = orjson.loads
        for column in self._json:
            text = row.get(column)
            if type(text) is str and text:
                try:  # noqa: SIM105 - as above
                    row[column] = loads(text)
                except orjson.JSONDecodeError:
                    pass  # stays text: validation fails naming the field, and describe() says why
        return row

    def describe(self, row: Any, described: str) -> str:
        """The message of a row that failed validation (``described``), with why each JSON cell that stayed text
        is not JSON. Runs per failed record only."""
        if not self._json or type(row) is not dict:
            return described
        bad = []
        for column in self._json:
            text = row.get(column)
            if type(text) is str and text:
                try:
                    orjson.loads(text)
                except orjson.JSONDecodeError as err:
                    bad.append(f"field '{column}': the CSV cell is not JSON ({err})")
        if not bad:
            return described
        hint = 'a CSV cell for a nested or list field holds JSON, such as {"city": "Lyon"} or ["a", "b"]'
        return f"{'; '.join(bad)}; {hint} ({described})"


@functools.lru_cache(maxsize=64)
def _fields(model: type[BaseModel]) -> dict[str, _Field]:
    """Each field's decision, under every key a row may name it by (its name and its alias)."""
    out: dict[str, _Field] = {}
    for name, info in model.model_fields.items():
        members = _members(info.annotation)
        nullable = any(m is type(None) or m is None or m is Any or m is object for m in members)
        concrete = [m for m in members if m is not type(None) and m is not None]
        empty: Any = None if nullable else (_DEFAULT if not info.is_required() else "")
        structured = bool(concrete) and all(_is_structured(m) for m in concrete)
        field = _Field(empty, structured, concrete == [int])
        keys = [name]
        keys += [alias for alias in (info.alias, info.validation_alias) if isinstance(alias, str)]
        out.update(dict.fromkeys(keys, field))
    return out


def _members(annotation: Any) -> list[Any]:
    """The types a value may have: the members of a union, Annotated's type, recursively."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _is_structured(annotation: Any) -> bool:
    """Whether a value of this type is written as JSON in a text cell (a model, a collection), not as text."""
    origin = typing.get_origin(annotation) or annotation
    if origin in _STRUCTURED_ORIGINS:
        return True
    if not isinstance(origin, type):
        return False
    if issubclass(origin, (str, bytes)):
        return False
    return (
        issubclass(origin, BaseModel)
        or dataclasses.is_dataclass(origin)
        or typing.is_typeddict(origin)
        or issubclass(origin, (list, tuple, set, frozenset, dict))
    )
