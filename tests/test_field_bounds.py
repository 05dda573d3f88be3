"""Every string field of every request is bounded at the service's edge (issue 11: bounds on every string field)."""
from __future__ import annotations

import pytest

from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.registry.v1 import registry_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2
from latentwire.vae.v1 import vae_pb2
from services.runtime import field_bounds
from services.runtime.errors import InvalidArgument


def _reason(message) -> tuple[str, dict]:
    with pytest.raises(InvalidArgument) as caught:
        field_bounds.check_request(message)
    return caught.value.reason, caught.value.metadata


def test_identifiers_and_texts_have_their_own_bounds():
    field_bounds.check_request(registry_pb2.GetModelRequest(name="m" * field_bounds.MAX_NAME_CHARS))
    reason, metadata = _reason(registry_pb2.GetModelRequest(name="m" * (field_bounds.MAX_NAME_CHARS + 1)))
    assert (reason, metadata["field"]) == ("FIELD_TOO_LONG", "name")
    field_bounds.check_request(text_encoder_pb2.EncodeRequest(prompts=["p" * field_bounds.MAX_TEXT_CHARS]))
    reason, metadata = _reason(text_encoder_pb2.EncodeRequest(prompts=["ok", "p" * (field_bounds.MAX_TEXT_CHARS + 1)]))
    assert (reason, metadata["field"]) == ("FIELD_TOO_LONG", "prompts[1]")


def test_nested_fields_and_map_entries_are_reached():
    request = denoiser_pb2.DenoiseRequest(controlnet=denoiser_pb2.ControlNetConditioning(address="a" * 5000))
    assert _reason(request) == ("FIELD_TOO_LONG", {"field": "controlnet.address", "max_chars": "1024"})
    text = vae_pb2.PngText()
    text.entries["k" * 2000] = "v"
    assert _reason(vae_pb2.DecodeRequest(png_texts=[text]))[0] == "FIELD_TOO_LONG"
    unit = controlnet_pb2.ControlNetUnit()
    unit.preprocessor_options["x" * 1025] = 1.0
    assert _reason(controlnet_pb2.ControlNetSetup(units=[unit]))[0] == "FIELD_TOO_LONG"


def test_a_message_that_is_within_every_bound_passes():
    request = registry_pb2.CreateModelRequest(model_id="sd-tiny", description="d" * 10_000)
    request.tags["owner"] = "team"
    field_bounds.check_request(request)
