"""The messages of a round, and the only place their content keys are spelled.

A round between the server and one node (federated/strategy.py drives it, federated/client_round.py answers)::

    server -> node   train.receive   ReceiveIns   a group of the global model (all groups but the last)
    node -> server                   Ack          stored
    server -> node   train           TrainIns     train at this learning rate (and FedProx's mu); the last
                                                  group rides along
    node -> server                   TrainRes     the update's first group, its manifest, weight and loss
    server -> node   train.send      SendIns      the keys of the update's next group
    node -> server                   SendRes      those tensors

once per node and run, before its first round (federated/roster.py)::

    server -> node   query             QueryIns    what is your name?
    node -> server                     QueryRes    partition-<i>, or node-<id>

and, in rounds with federated evaluation (``eval.every-round``), for the round's new global model::

    server -> node   evaluate.receive  ReceiveIns  a group of the global model (all but the last)
    node -> server                     Ack
    server -> node   evaluate          EvaluateIns the last group: compute the held-out loss
    node -> server                     EvaluateRes the loss and how many examples it averages

Every instruction carries the round number and the profile flag (:class:`Header`), so a node's client mod
knows whether to record without parsing the run config. Each dataclass becomes a Flower ``RecordDict``
with :meth:`to_content` and is read back with :meth:`from_content`; content that lacks a record or key
raises :class:`ProtocolError` naming it. Weights travel as one safetensors ``ArrayRecord``
(weights/transport.py), which this module carries without decoding.

Importing this module costs no torch: a deployment ClientApp (a new process per message) reads the header
and hands the content on. Only a manifest's specs need torch's dtypes, imported where they are decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:
    from flowertune_llm.weights.tensors import TensorSpec

# Message types. Flower routes ``train.<action>`` to ``@app.train("<action>")``.
RECEIVE = "train.receive"
TRAIN = "train"
SEND = "train.send"
EVALUATE_RECEIVE = "evaluate.receive"
EVALUATE = "evaluate"
QUERY = "query"

# Records of a content.
_ARRAYS, _CONFIG, _METRICS, _PROFILE = "arrays", "config", "metrics", "profile"
# Keys of the config and metric records.
_ROUND, _PROFILE_ON = "server-round", "profile"
_GROUP, _GROUPS, _MANIFEST, _ENCODING = "group", "groups", "manifest", "encoding"
_LEARNING_RATE, _PROXIMAL_MU, _REPLY_KEYS, _KEYS = "learning-rate", "proximal-mu", "reply-keys", "keys"
_WEIGHT, _TRAIN_LOSS, _STEP_SECONDS = "weight", "train-loss", "step-seconds"
_EVAL_LOSS, _EXAMPLES = "eval-loss", "examples"
_NAME = "name"
_EVENTS = "events"


class ProtocolError(ValueError):
    """Content that is not the message it claims to be; the text names what is missing."""


def _record(content: RecordDict, name: str) -> Any:
    if name not in content:
        raise ProtocolError(f"message lacks the {name!r} record (it has: {', '.join(content) or 'none'})")
    return content[name]


def _value(record: ConfigRecord | MetricRecord, key: str, record_name: str) -> Any:
    if key not in record:
        raise ProtocolError(f"message's {record_name!r} record lacks {key!r}")
    return record[key]


def _manifest_to_json(manifest: dict[str, TensorSpec]) -> str:
    from flowertune_llm.weights.tensors import specs_to_json

    return specs_to_json(manifest)


def _manifest_from_json(text: str) -> dict[str, TensorSpec]:
    from flowertune_llm.weights.tensors import specs_from_json

    return specs_from_json(text)


@dataclass(frozen=True)
class Header:
    """What every instruction says besides its own fields: the round, and whether the node should profile it."""

    server_round: int
    profile: bool = False

    def to_config(self) -> dict[str, Any]:
        return {_ROUND: self.server_round, _PROFILE_ON: self.profile}

    @classmethod
    def from_content(cls, content: RecordDict) -> Header:
        config = _record(content, _CONFIG)
        return cls(int(_value(config, _ROUND, _CONFIG)), bool(config.get(_PROFILE_ON, False)))


@dataclass(frozen=True)
class Group:
    """Group ``index`` of ``count`` of the global model; the first carries every tensor's spec (the manifest),
    so a node knows when it holds the whole model and can check its disk space first.

    ``encoding`` says what ``arrays`` hold (``exchange.update-format``, weights/codec.py): ``""`` the weights
    as stored; ``"<format>:<r>"`` their change from the global model after round ``r``, which the node
    holds; ``"held:<r>"`` nothing: the node holds this global model already (it is round ``r``'s), so only
    the last group's message goes, empty.
    """

    index: int
    count: int
    arrays: ArrayRecord
    manifest: dict[str, TensorSpec] | None = None
    encoding: str = ""

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {_GROUP: self.index, _GROUPS: self.count, _ENCODING: self.encoding}
        if self.manifest is not None:
            config[_MANIFEST] = _manifest_to_json(self.manifest)
        return config

    @classmethod
    def _from(cls, content: RecordDict) -> Group:
        config = _record(content, _CONFIG)
        manifest = _manifest_from_json(str(config[_MANIFEST])) if _MANIFEST in config else None
        return cls(int(_value(config, _GROUP, _CONFIG)), int(_value(config, _GROUPS, _CONFIG)),
                   _record(content, _ARRAYS), manifest, str(config.get(_ENCODING, "")))  # fmt: skip

    @property
    def base_round(self) -> int | None:
        """The round of the global model a change is taken from, or that the node holds; None for weights."""
        return int(self.encoding.rsplit(":", 1)[1]) if self.encoding else None

    @property
    def held(self) -> bool:
        return self.encoding.startswith(HELD + ":")

    @property
    def change_format(self) -> str | None:
        """The update format of a change (``bfloat16``, ``int8``), or None."""
        return self.encoding.split(":", 1)[0] if self.encoding and not self.held else None


HELD = "held"


def change_encoding(update_format: str, base_round: int) -> str:
    return f"{update_format}:{base_round}"


def held_encoding(model_round: int) -> str:
    return f"{HELD}:{model_round}"


@dataclass(frozen=True)
class _GroupIns:
    header: Header
    group: Group

    def to_content(self) -> RecordDict:
        config = ConfigRecord({**self.header.to_config(), **self.group._config()})
        return RecordDict({_ARRAYS: self.group.arrays, _CONFIG: config})

    @classmethod
    def from_content(cls, content: RecordDict):
        return cls(Header.from_content(content), Group._from(content))


@dataclass(frozen=True)
class ReceiveIns(_GroupIns):
    """``train.receive`` and ``evaluate.receive``: store this group of the global model."""


@dataclass(frozen=True)
class Ack:
    """The reply to ``train.receive``: the group is stored."""

    def to_content(self) -> RecordDict:
        return RecordDict()


@dataclass(frozen=True)
class TrainIns:
    """``train``: train at ``learning_rate`` (the server's schedule) and answer with the update's ``reply_keys``.

    ``group`` is the global model's last group when the model goes down this round (None when the nodes
    already hold it: an aggregation-only run's first round). ``proximal_mu`` > 0 adds FedProx's
    (mu/2)·||w - w_global||² to the node's loss.
    """

    header: Header
    learning_rate: float
    reply_keys: list[str]
    group: Group | None = None
    proximal_mu: float = 0.0

    def to_content(self) -> RecordDict:
        config = {**self.header.to_config(), _LEARNING_RATE: self.learning_rate, _PROXIMAL_MU: self.proximal_mu,
                  _REPLY_KEYS: list(self.reply_keys)}  # fmt: skip
        content = RecordDict()
        if self.group is not None:
            config.update(self.group._config())
            content[_ARRAYS] = self.group.arrays
        content[_CONFIG] = ConfigRecord(config)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainIns:
        config = _record(content, _CONFIG)
        return cls(
            Header.from_content(content),
            float(_value(config, _LEARNING_RATE, _CONFIG)),
            [str(key) for key in _value(config, _REPLY_KEYS, _CONFIG)],
            Group._from(content) if _ARRAYS in content else None,
            float(_value(config, _PROXIMAL_MU, _CONFIG)),
        )


@dataclass(frozen=True)
class TrainRes:
    """The reply to ``train``: the first group of the node's update, the spec of all of it, and its FedAvg weight."""

    arrays: ArrayRecord
    manifest: dict[str, TensorSpec]
    weight: float  # the node's examples, or its aggregation-weight in an aggregation-only run
    train_loss: float | None = None  # None when nothing was trained
    step_seconds: float | None = None  # the optimizer steps alone

    def to_content(self) -> RecordDict:
        metrics: dict[str, float] = {_WEIGHT: float(self.weight)}
        if self.train_loss is not None:
            metrics[_TRAIN_LOSS] = float(self.train_loss)
        if self.step_seconds is not None:
            metrics[_STEP_SECONDS] = float(self.step_seconds)
        return RecordDict({_ARRAYS: self.arrays, _METRICS: MetricRecord(metrics),
                           _CONFIG: ConfigRecord({_MANIFEST: _manifest_to_json(self.manifest)})})  # fmt: skip

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRes:
        metrics = _record(content, _METRICS)
        loss, steps = metrics.get(_TRAIN_LOSS), metrics.get(_STEP_SECONDS)
        return cls(
            _record(content, _ARRAYS),
            _manifest_from_json(str(_value(_record(content, _CONFIG), _MANIFEST, _CONFIG))),
            float(_value(metrics, _WEIGHT, _METRICS)),
            None if loss is None else float(loss),
            None if steps is None else float(steps),
        )


@dataclass(frozen=True)
class SendIns:
    """``train.send``: answer with these keys of this round's update."""

    header: Header
    keys: list[str]

    def to_content(self) -> RecordDict:
        return RecordDict({_CONFIG: ConfigRecord({**self.header.to_config(), _KEYS: list(self.keys)})})

    @classmethod
    def from_content(cls, content: RecordDict) -> SendIns:
        keys = _value(_record(content, _CONFIG), _KEYS, _CONFIG)
        return cls(Header.from_content(content), [str(key) for key in keys])


@dataclass(frozen=True)
class SendRes:
    """The reply to ``train.send``: one more group of the update."""

    arrays: ArrayRecord

    def to_content(self) -> RecordDict:
        return RecordDict({_ARRAYS: self.arrays})

    @classmethod
    def from_content(cls, content: RecordDict) -> SendRes:
        return cls(_record(content, _ARRAYS))


@dataclass(frozen=True)
class EvaluateIns(_GroupIns):
    """``evaluate``: compute the loss of the global model (its last group rides along) on the held-out data."""


@dataclass(frozen=True)
class EvaluateRes:
    """The reply to ``evaluate``: the mean completion loss over ``examples`` held-out examples."""

    loss: float
    examples: int

    def to_content(self) -> RecordDict:
        return RecordDict({_METRICS: MetricRecord({_EVAL_LOSS: float(self.loss), _EXAMPLES: int(self.examples)})})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateRes:
        metrics = _record(content, _METRICS)
        return cls(float(_value(metrics, _EVAL_LOSS, _METRICS)), int(_value(metrics, _EXAMPLES, _METRICS)))


@dataclass(frozen=True)
class QueryIns:
    """``query``: the node's stable name."""

    header: Header

    def to_content(self) -> RecordDict:
        return RecordDict({_CONFIG: ConfigRecord(self.header.to_config())})


@dataclass(frozen=True)
class QueryRes:
    name: str

    def to_content(self) -> RecordDict:
        return RecordDict({_CONFIG: ConfigRecord({_NAME: self.name})})

    @classmethod
    def from_content(cls, content: RecordDict) -> QueryRes:
        return cls(str(_value(_record(content, _CONFIG), _NAME, _CONFIG)))


def arrays_of(content: RecordDict) -> ArrayRecord | None:
    """A content's weights, if it carries any: what the server bills for a message each way."""
    return content[_ARRAYS] if _ARRAYS in content else None


# --- profile events, carried back in a reply --------------------------------------------------------------


def attach_events(content: RecordDict, events: list[dict[str, Any]]) -> None:
    """Put a node's profile events into its reply (observe/profiling.py's client mod)."""
    content[_PROFILE] = ConfigRecord({_EVENTS: json.dumps(events)})


def events_of(content: RecordDict) -> list[dict[str, Any]]:
    """A reply's profile events; [] when it carries none."""
    if _PROFILE not in content:
        return []
    return json.loads(str(content[_PROFILE][_EVENTS]))
