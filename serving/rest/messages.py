"""Protocol-buffer messages as the REST API's JSON, the way Triton's HTTP endpoint writes
them: proto field names, every scalar and repeated field written (defaults too), message
fields and oneof members only when set, enums by name, and 64-bit integers as JSON numbers
(protobuf's own JSON mapping writes them as strings, which perf_analyzer's HTTP client
cannot read as statistics). float32 fields are written as their shortest decimal."""

from __future__ import annotations

import base64

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_json(message: Message) -> dict[str, object]:
    """`message` as a JSON-ready dict."""
    result: dict[str, object] = {}
    for field in message.DESCRIPTOR.fields:
        if _left_out(message, field):
            continue
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            result[field.name] = [_value(field, item) for item in value]
        else:
            result[field.name] = _value(field, value)
    return result


def _left_out(message: Message, field: FieldDescriptor) -> bool:
    if field.label == FieldDescriptor.LABEL_REPEATED:
        return False
    if field.message_type is not None or field.containing_oneof is not None:
        return not message.HasField(field.name)
    return False


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.label == FieldDescriptor.LABEL_REPEATED
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _value(field: FieldDescriptor, value: object) -> object:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)  # type: ignore[arg-type]
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)  # type: ignore[arg-type]
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_FLOAT:
        # Python widens float32 to a double (0.9 -> 0.8999999761581421); its shortest
        # float32 decimal reads back as the same float32.
        return float(str(np.float32(value)))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")  # type: ignore[arg-type]
    return value
