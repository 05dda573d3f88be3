"""Bounds on every string field of every request, checked once at each service's edge.

The interceptor calls ``check_request`` on each request message (each message of a request stream)
before the handler sees it, so no service keeps, logs or echoes an unbounded name, id or text. The
rules go by the field's name, from the descriptor, so a field added to a contract later is bounded
without a line of code here:

- identifiers (names, ids, aliases, tags, keys, schedulers, tokens, addresses, versions):
  at most ``MAX_NAME_CHARS`` characters;
- free text (prompts, descriptions, PNG text values, anything else): at most ``MAX_TEXT_CHARS``;
- map keys count as identifiers; repeated fields hold at most ``MAX_REPEATED`` entries;
- a field with a rule of its own (job ids: ``limits.check_job_id``) gets that rule here instead, and a
  field bounded where it is read with a more telling reason (a checkpoint's scheduler attributes) is
  left to that check.

Bytes fields (images, tensors, blob chunks) are bounded by the message size limit
(``--max-message-bytes``) and by the checks of the RPC that reads them. Limits a service makes
tighter by flag (``--max-prompt-chars``, job ids of 128 characters) are checked where they apply,
after these.
"""
from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import InvalidArgument
from .limits import check_job_id

#: Longest identifier-like string field, in characters (model names, ids, keys, tags, addresses).
MAX_NAME_CHARS = 1024
#: Longest free-text string field, in characters (prompts, descriptions, PNG text values).
MAX_TEXT_CHARS = 65536
#: Most entries in one repeated or map field.
MAX_REPEATED = 65536
#: Deepest message nesting looked into (protobuf's own decoder stops at 100).
MAX_DEPTH = 32

#: Fields with a rule of their own, checked here in its words instead of the generic bound: job ids (128
#: characters, a safe alphabet: limits.check_job_id).
_OWN_RULES = {"job_id": check_job_id}
#: Fields bounded where they are read, with a reason that says more: a denoiser checkpoint's scheduler
#: attributes (64 KiB of JSON, services/denoiser/checkpoint.py, CHECKPOINT_MISMATCH).
_BOUNDED_WHERE_READ = frozenset({"latentwire.denoiser.v1.SchedulerState.attributes_json"})

#: A string field whose name ends with one of these is an identifier.
_NAME_SUFFIXES = ("name", "_id", "id", "ids", "names", "model", "alias", "aliases", "tag", "tags", "key", "keys",
                  "scheduler", "address", "token", "version", "digest", "path", "preprocessor", "dtype", "device",
                  "format", "mode", "state", "filter", "order_by", "kind", "sampler", "label", "sha256", "parent",
                  "reference", "source", "component")


def _is_name(field: FieldDescriptor) -> bool:
    return field.name.endswith(_NAME_SUFFIXES)


def _limit(field: FieldDescriptor) -> int:
    return MAX_NAME_CHARS if _is_name(field) else MAX_TEXT_CHARS


def _too_long(path: str, length: int, limit: int) -> InvalidArgument:
    return InvalidArgument(f"{path} is {length} characters; send at most {limit}", reason="FIELD_TOO_LONG",
                           metadata={"field": path, "max_chars": str(limit)})


def _check(message: Message, prefix: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"{prefix or 'the request'} nests messages deeper than {MAX_DEPTH} levels",
                              reason="REQUEST_TOO_DEEP", metadata={"field": prefix})
    for field, value in message.ListFields():
        path = f"{prefix}.{field.name}" if prefix else field.name
        repeated = field.is_repeated
        if repeated and len(value) > MAX_REPEATED:
            raise InvalidArgument(f"{path} has {len(value)} entries; send at most {MAX_REPEATED}",
                                  reason="TOO_MANY_ENTRIES", metadata={"field": path})
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for key in value:
                if key_field.type == FieldDescriptor.TYPE_STRING and len(key) > MAX_NAME_CHARS:
                    raise _too_long(f"{path} key", len(key), MAX_NAME_CHARS)
                item = value[key]
                if value_field.type == FieldDescriptor.TYPE_STRING and len(item) > MAX_TEXT_CHARS:
                    raise _too_long(f"{path} value", len(item), MAX_TEXT_CHARS)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    _check(item, f"{path} value", depth + 1)
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.full_name in _BOUNDED_WHERE_READ:
                continue
            rule = _OWN_RULES.get(field.name)
            if rule is not None and not repeated:
                rule(value, path)
                continue
            limit = _limit(field)
            for index, text in enumerate(value if repeated else (value,)):
                if len(text) > limit:
                    raise _too_long(f"{path}[{index}]" if repeated else path, len(text), limit)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for index, item in enumerate(value if repeated else (value,)):
                _check(item, f"{path}[{index}]" if repeated else path, depth + 1)


def check_request(message: Message) -> None:
    """Raise InvalidArgument (FIELD_TOO_LONG, TOO_MANY_ENTRIES, REQUEST_TOO_DEEP) when a field is past its bound."""
    if isinstance(message, Message):
        _check(message, "", 0)
