"""The `resources` section of params.yaml: the CPU and memory each Kubeflow task asks for (requests) and may use
(limits), composed into `lightclip_core.config`. No stage reads it: `pipelines/full.py` compiles it into the DAG, and
the multi-node TrainJob takes its nodes' CPU and memory from `resources.train`.

Quantities are Kubernetes quantities in the forms both Kubernetes and the KFP compiler accept: CPU as cores (`2`,
`0.5`) or millicores (`500m`); memory as bytes with a binary (`Mi`, `Gi`, ...) or decimal (`M`, `G`, ...) suffix.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from lightclip_core.infra.schema import Section

_CPU = re.compile(r"^(?:[0-9]+m|[0-9]*\.?[0-9]+)$")
_MEMORY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")  # KFP also takes "K", which Kubernetes does not
_MEMORY_FACTOR = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                  "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def cpu_cores(text: str) -> float:
    """`500m` -> 0.5, `2` -> 2.0; ValueError for anything that is not a CPU quantity."""
    if not _CPU.match(text):
        raise ValueError("not a CPU quantity: cores (2, 0.5) or millicores (500m)")
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(text: str) -> int:
    """`512Mi` -> 536870912; ValueError for anything that is not a memory quantity."""
    found = _MEMORY.match(text)
    if not found:
        hint = f" (milli-bytes; did you mean {text[:-1]}Mi?)" if text.endswith("m") else ""
        raise ValueError(f"not a memory quantity: bytes with a suffix such as 512Mi, 8Gi, 2G{hint}")
    return int(found.group(1)) * _MEMORY_FACTOR[found.group(2)]


class TaskResources(Section):
    """What one task's container asks for and may use. Requests reserve a node's capacity for the task; at the
    memory limit the container is killed, above the CPU limit it is throttled."""

    cpu_request: str = Field(description="CPU reserved for the task (500m, 2)")
    cpu_limit: str = Field(description="CPU the task may use at most")
    memory_request: str = Field(description="memory reserved for the task (512Mi, 8Gi)")
    memory_limit: str = Field(description="memory at which the task is killed")

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("cpu_request", "cpu_limit")
    @classmethod
    def _cpu(cls, value: str) -> str:
        if cpu_cores(value) <= 0:
            raise ValueError("must be more than 0")
        return value

    @field_validator("memory_request", "memory_limit")
    @classmethod
    def _memory(cls, value: str) -> str:
        if memory_bytes(value) <= 0:
            raise ValueError("must be more than 0")
        return value

    @model_validator(mode="after")
    def _request_within_limit(self) -> TaskResources:
        if cpu_cores(self.cpu_request) > cpu_cores(self.cpu_limit):
            raise ValueError(f"cpu_request {self.cpu_request} is above cpu_limit {self.cpu_limit}")
        if memory_bytes(self.memory_request) > memory_bytes(self.memory_limit):
            raise ValueError(f"memory_request {self.memory_request} is above memory_limit {self.memory_limit}")
        return self


def _task(cpu_request: str, cpu_limit: str, memory_request: str, memory_limit: str) -> TaskResources:
    return TaskResources(cpu_request=cpu_request, cpu_limit=cpu_limit, memory_request=memory_request,
                         memory_limit=memory_limit)


class ResourcesConfig(Section):
    """One entry per Kubeflow task, named like the params.yaml section the task reads (`registry`: the register
    task); `control` covers the small bookkeeping tasks (plan-reinforce, publish-reinforced, local-gpus)."""

    prepare: TaskResources = _task("1", "4", "2Gi", "8Gi")
    teacher: TaskResources = _task("4", "8", "8Gi", "32Gi")
    reinforce: TaskResources = _task("4", "8", "8Gi", "32Gi")
    train: TaskResources = _task("16", "16", "64Gi", "64Gi")
    export: TaskResources = _task("2", "4", "4Gi", "16Gi")
    evaluate: TaskResources = _task("2", "4", "4Gi", "16Gi")
    registry: TaskResources = _task("1", "2", "2Gi", "8Gi")
    control: TaskResources = _task("250m", "1", "1Gi", "2Gi")
