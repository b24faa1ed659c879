"""Typed descriptions a DataModule gives of its data, which the paradigm modules build from.

They live with the data (``benchmarks/``), not with the models: the data side states what it serves and
the paradigms import it, never the other way round. Every DataModule of the project has a ``spec``
property returning one of these; a paradigm module reads it at ``setup`` (never probing the DataModule's
attributes), builds its network from it once and keeps it in its checkpoints (:meth:`DataSpec.to_dict`,
plain values only), so ``load_from_checkpoint`` rebuilds the same network without the data.

Fields marked ``compare=False`` are facts about how the data is served (e.g. epochs per experience), not
about the network's shape: two specs that differ only there build the same network.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..checks import SETTINGS, check_positive

__all__ = ["TaskSpec", "DataSpec", "SupervisedSpec", "MultiTaskSpec", "StreamSpec", "EpisodeSpec", "EnvSpec",
           "SETTINGS", "check_positive"]  # the last two re-exported from moeparadigms.checks


@dataclass
class TaskSpec:
    """One task: its name, ``kind`` and, for classification, the number of classes."""

    name: str
    kind: Literal["regression", "classification"] = "regression"
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"task {self.name!r}: kind={self.kind!r} is not supported; choose 'regression' or 'classification'")
        if self.kind == "classification" and (not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"task {self.name!r}: classification needs num_classes >= 2, got {self.num_classes!r}")

    @property
    def out_features(self) -> int:
        return 1 if self.kind == "regression" else self.num_classes


@dataclass(frozen=True)
class DataSpec:
    """Base of the specs: ``to_dict`` / ``from_dict`` as plain data (what checkpoints hold)."""

    #: which paradigm's data this describes (for error messages)
    paradigm: ClassVar[str] = "any"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SupervisedSpec(DataSpec):
    """Classification of flattened inputs: ``in_features`` -> one of ``num_classes`` classes."""

    paradigm: ClassVar[str] = "supervised"
    in_features: int
    num_classes: int

    def __post_init__(self) -> None:
        check_positive(in_features=self.in_features, num_classes=self.num_classes)


@dataclass(frozen=True)
class MultiTaskSpec(DataSpec):
    """Inputs of ``in_features`` features, each sample labelled for the ``tasks`` (in target-column order)."""

    paradigm: ClassVar[str] = "multitask"
    in_features: int
    tasks: tuple[TaskSpec, ...]

    def __post_init__(self) -> None:
        check_positive(in_features=self.in_features)
        tasks = tuple(t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in self.tasks)
        if not tasks:
            raise ValueError("tasks must list at least one TaskSpec")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        object.__setattr__(self, "tasks", tasks)


@dataclass(frozen=True)
class StreamSpec(DataSpec):
    """A continual stream: experience ``t`` holds classes ``classes_per_experience[t]`` of ``num_classes``;
    one ``trainer.fit`` spends ``epochs_per_experience`` epochs on each experience."""

    paradigm: ClassVar[str] = "continual"
    in_features: int
    num_classes: int
    setting: str
    classes_per_experience: tuple[tuple[int, ...], ...]
    epochs_per_experience: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        check_positive(in_features=self.in_features, num_classes=self.num_classes,
                       epochs_per_experience=self.epochs_per_experience)
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting!r} is not supported; choose one of {list(SETTINGS)}")
        cpe = tuple(tuple(int(c) for c in cs) for cs in self.classes_per_experience)
        if not cpe:
            raise ValueError("a stream needs at least one experience")
        object.__setattr__(self, "classes_per_experience", cpe)

    @property
    def num_experiences(self) -> int:
        return len(self.classes_per_experience)

    @property
    def max_epochs(self) -> int:
        """Epochs for the whole stream (``trainer.max_epochs``)."""
        return self.num_experiences * self.epochs_per_experience

    def experience_at(self, epoch: int) -> int:
        """The experience served in ``epoch``."""
        return min(epoch // self.epochs_per_experience, self.num_experiences - 1)


@dataclass(frozen=True)
class EpisodeSpec(DataSpec):
    """Episodes of (support, query) tasks mapping ``in_features`` to ``out_features`` (a regression value,
    or logits over ``out_features`` classes)."""

    paradigm: ClassVar[str] = "meta"
    in_features: int
    out_features: int
    kind: Literal["regression", "classification"] = "regression"

    def __post_init__(self) -> None:
        check_positive(in_features=self.in_features, out_features=self.out_features)
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"kind={self.kind!r} is not supported; choose 'regression' or 'classification'")

    def to_dict(self) -> dict[str, Any]:
        # checkpoints keep the key MetaMoE always wrote (``task_kind``), so older readers still read them
        return {"in_features": self.in_features, "out_features": self.out_features, "task_kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeSpec:
        d = dict(d)
        if "task_kind" in d:
            d.setdefault("kind", d.pop("task_kind"))
        return super().from_dict(d)  # type: ignore[return-value]


@dataclass(frozen=True)
class EnvSpec(DataSpec):
    """A vector environment: 1-D observations of ``obs_dim`` features, an action space described as plain
    data (``{"kind": "discrete", "n"}`` or ``{"kind": "box", "dim", "low", "high"}``), and ``num_tasks``
    (multi-task environments end their observation with the one-hot task id)."""

    paradigm: ClassVar[str] = "rl"
    obs_dim: int
    action_spec: dict
    num_tasks: int = 1

    def __post_init__(self) -> None:
        check_positive(obs_dim=self.obs_dim, num_tasks=self.num_tasks)
        if self.action_spec.get("kind") not in ("discrete", "box"):
            raise ValueError(f"action_spec must describe a Discrete or 1-D Box space, got {self.action_spec!r}")
        if self.num_tasks > 1 and self.obs_dim <= self.num_tasks:
            raise ValueError(f"num_tasks={self.num_tasks} needs observations that end with a one-hot task id; "
                             f"got obs_dim={self.obs_dim}")

    @property
    def discrete(self) -> bool:
        return self.action_spec["kind"] == "discrete"

    @property
    def action_dim(self) -> int:
        """Outputs of the actor: the number of actions (discrete) or the action dimensions (box)."""
        return int(self.action_spec["n"] if self.discrete else self.action_spec["dim"])
