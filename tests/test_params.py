import pytest

from sdstack.errors import UserError
from sdstack.params import PARAMS, make_params


def test_defaults_come_from_the_schema():
    p = make_params(prompt="x")
    for spec in PARAMS:
        if spec.name not in ("prompt", "sampler_name", "scheduler"):
            assert getattr(p, spec.name) == spec.default


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, "between"), ("width", 100, "multiple of 8"), ("cfg_scale", "abc", "float"),
    ("steps", 2.5, "whole"), ("sampler_name", "Nope", "valid"), ("denoising_strength", 1.5, "between"),
    ("hr_upscaler", "ESRGAN_4x", "valid"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(UserError) as e:
        make_params(prompt="x", **{field: value})
    assert needle in str(e.value)
    assert e.value.field == field or field in ("sampler_name",)


def test_unknown_parameter():
    with pytest.raises(UserError, match="unknown parameter"):
        make_params(prompt="x", stepz=3)


def test_old_combined_sampler_names_resolve():
    p = make_params(prompt="x", sampler_name="DPM++ 2M Exponential")
    assert (p.sampler_name, p.scheduler) == ("DPM++ 2M", "Exponential")
    # A1111: a scheduler equal to the sampler's default is stored as "Automatic"
    p = make_params(prompt="x", sampler_name="k_dpmpp_2m_ka")
    assert (p.sampler_name, p.scheduler) == ("DPM++ 2M", "Automatic")
