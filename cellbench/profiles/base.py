"""The base of every model that reads user input: unknown keys are errors that say what is known."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """A model whose unknown keys are errors that name the key and list the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    what: ClassVar[str] = "field"

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known and key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown {what} '{key}' (expected one of: {expected})",
                        {"what": cls.what, "key": key, "expected": ", ".join(known)},
                    )
        return data


