"""HTML forms for the settings groups, built from the groups' own pydantic models.

A group's model decides the controls: a checkbox for a bool, a number for an int, a
select for a Literal, a text box for a string, a fieldset for a nested model, a set of
checkboxes for a list of choices, one line per item for a list of strings, and repeated
fieldsets (with a blank one to add) for a list of models. The form posts the whole
group; `parse` turns it back into the group's value, and the API's service validates
it, so the console accepts exactly what the API accepts.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from starlette.datastructures import FormData

Kind = Literal["checkbox", "number", "decimal", "select", "text", "lines", "choices"]


@dataclass
class Control:
    """One input: its dotted name inside the group, label, kind and current value."""

    name: str
    label: str
    kind: Kind
    value: Any
    options: tuple[str, ...] = ()
    optional: bool = False
    max_length: int | None = None

    @property
    def id(self) -> str:
        """The element id: the name, with dots that CSS selectors and labels can live with."""
        return "f-" + self.name.replace(".", "-")


@dataclass
class Group:
    """A fieldset: a nested model, or one item of a list of models."""

    name: str
    label: str
    children: list[Control | Group] = field(default_factory=list)
    item_of: str | None = None
    """For an item of a list of models: the list's name (the item can be removed)."""

    @property
    def id(self) -> str:
        """The element id of the fieldset."""
        return "g-" + self.name.replace(".", "-")


def label_of(name: str) -> str:
    """`order_received` -> `Order received`."""
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    """The bare type, its Annotated metadata, and whether None is allowed."""
    metadata: list[Any] = []
    optional = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            metadata.extend(extra)
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            optional = optional or len(members) < len(get_args(annotation))
            if len(members) != 1:
                return annotation, metadata, optional
            annotation = members[0]
        else:
            return annotation, metadata, optional


def _max_length(metadata: list[Any]) -> int | None:
    for item in metadata:
        limit = getattr(item, "max_length", None)
        if isinstance(limit, int):
            return limit
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def controls(
    model: type[BaseModel], value: dict[str, Any], prefix: str = ""
) -> list[Control | Group]:
    """The controls of `model`, filled with `value` (the stored group, or what was posted)."""
    built: list[Control | Group] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        current = value.get(name) if isinstance(value, dict) else None
        bare, metadata, optional = unwrap(info.annotation)
        metadata += list(info.metadata)
        label = label_of(name)
        if _is_model(bare):
            built.append(Group(dotted, label, controls(bare, current or {}, f"{dotted}.")))
        elif get_origin(bare) is list:
            built.append(_list_control(dotted, label, get_args(bare)[0], current or []))
        elif bare is bool:
            built.append(Control(dotted, label, "checkbox", bool(current)))
        elif bare is int:
            built.append(Control(dotted, label, "number", current, optional=optional))
        elif bare is float:
            built.append(Control(dotted, label, "decimal", current, optional=optional))
        elif get_origin(bare) is Literal:
            options = tuple(str(option) for option in get_args(bare))
            built.append(Control(dotted, label, "select", current, options, optional))
        else:
            built.append(
                Control(
                    dotted,
                    label,
                    "text",
                    current,
                    optional=optional,
                    max_length=_max_length(metadata),
                )
            )
    return built


def _list_control(name: str, label: str, item: Any, current: list[Any]) -> Control | Group:
    bare, _, _ = unwrap(item)
    if _is_model(bare):
        items = [*current, {}]  # the blank one adds an item
        group = Group(name, label)
        for index, entry in enumerate(items):
            item_name = f"{name}.{index}"
            caption = f"{label_of(bare.__name__)} {index + 1}" if index < len(current) else "Add"
            group.children.append(
                Group(
                    item_name,
                    caption,
                    controls(bare, entry if isinstance(entry, dict) else {}, f"{item_name}."),
                    item_of=name,
                )
            )
        return group
    if get_origin(bare) is Literal:
        options = tuple(str(option) for option in get_args(bare))
        return Control(name, label, "choices", list(current), options)
    return Control(name, label, "lines", "\n".join(str(line) for line in current))


@dataclass
class Parsed:
    """A posted group: the value to send to the service, and what could not even be read."""

    value: dict[str, Any]
    errors: dict[str, str]


def parse(model: type[BaseModel], form: FormData, prefix: str = "") -> Parsed:
    """The group's value from a posted form. Types are checked by the service; this only
    reads numbers as numbers and reports those that are not, by field, never by value."""
    value: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        bare, _, optional = unwrap(info.annotation)
        if _is_model(bare):
            inner = parse(bare, form, f"{dotted}.")
            value[name] = inner.value
            errors |= inner.errors
        elif get_origin(bare) is list:
            value[name] = _parse_list(dotted, get_args(bare)[0], form, errors)
        elif bare is bool:
            value[name] = dotted in form
        else:
            read, error = _parse_text(form.get(dotted), bare, optional=optional)
            if error is None:
                value[name] = read
            else:
                errors[dotted] = error
    return Parsed(value, errors)


def _parse_text(raw: object, bare: Any, *, optional: bool) -> tuple[Any, str | None]:
    """One text field: its value, or why it could not be read."""
    text = raw.strip() if isinstance(raw, str) else ""
    if text == "":
        if optional:
            return None, None  # a merge patch's null: back to the default (none)
        if bare is str:
            return "", None
        return None, "a value is required"
    if bare is int:
        return _whole_number(text)
    if bare is float:
        return _finite_number(text)
    return text, None


def _whole_number(text: str) -> tuple[int | None, str | None]:
    try:
        return int(text), None
    except ValueError:
        return None, "must be a whole number"


def _finite_number(text: str) -> tuple[float | None, str | None]:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number):
        return number, None
    return None, "must be a number"


def _parse_list(name: str, item: Any, form: FormData, errors: dict[str, str]) -> list[Any]:
    bare, _, _ = unwrap(item)
    if _is_model(bare):
        items = []
        index = 0
        while f"{name}.{index}.present" in form:
            item_name = f"{name}.{index}"
            index += 1
            if f"{item_name}.remove" in form:
                continue
            entry = parse(bare, form, f"{item_name}.")
            if _blank(entry.value):
                continue  # the empty "Add" fieldset
            errors |= entry.errors
            items.append(entry.value)
        return items
    if get_origin(bare) is Literal:
        return [choice for choice in form.getlist(name) if isinstance(choice, str)]
    raw = form.get(name)
    lines = raw.splitlines() if isinstance(raw, str) else []
    return [line.strip() for line in lines if line.strip()]


def _blank(value: Any) -> bool:
    """True when nothing was typed or chosen (checkboxes alone do not make an item)."""
    if isinstance(value, dict):
        return all(_blank(v) or isinstance(v, bool) for v in value.values())
    return value in (None, "", [])


def field_errors(group: str, errors: list[dict[str, str]] | None) -> dict[str, str]:
    """The service's field errors (`branding.logo_url`) by control name (`logo_url`)."""
    found: dict[str, str] = {}
    for error in errors or []:
        name = error.get("field", "")
        if name == group or not name.startswith(f"{group}."):
            found.setdefault("", error.get("message", ""))
            continue
        found.setdefault(name[len(group) + 1 :], error.get("message", ""))
    return found
