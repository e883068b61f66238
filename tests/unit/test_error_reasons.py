"""One short line per error: the reasons /health and the weight stores show."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, field_validator

from llm_fleet.deployments.errors import REASON_MAX_CHARS, exception_reason, short_reason


class _Engine(BaseModel):
    dtype: str

    @field_validator("dtype")
    @classmethod
    def _known(cls, value: str) -> str:
        raise ValueError(f"dtype {value} is not supported on this device")


def test_a_reason_is_the_type_and_the_first_line_of_the_message() -> None:
    error = RuntimeError("\n  CUDA out of memory  \nTried to allocate 2 GiB\n")
    assert exception_reason(error) == "RuntimeError: CUDA out of memory"
    assert exception_reason(error, lines=2) == (
        "RuntimeError: CUDA out of memory Tried to allocate 2 GiB"
    )
    assert exception_reason(error, lines=None) == exception_reason(error, lines=2)


def test_an_error_without_a_message_is_its_type() -> None:
    assert exception_reason(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert exception_reason(OSError(" \n ")) == "OSError"


def test_a_validation_error_gives_its_first_errors_message() -> None:
    with pytest.raises(Exception) as caught:
        _Engine(dtype="float8")
    assert exception_reason(caught.value) == (
        "ValidationError: dtype float8 is not supported on this device"
    )


def test_a_reason_is_cut_to_its_limit() -> None:
    assert (
        exception_reason(ValueError("x" * 2000)) == ("ValueError: " + "x" * 2000)[:REASON_MAX_CHARS]
    )
    assert short_reason("y" * 2000 + "\nsecond") == "y" * REASON_MAX_CHARS
    assert short_reason(" \n") == ""
