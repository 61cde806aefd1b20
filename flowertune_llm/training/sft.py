"""One round of local supervised fine-tuning with TRL, at the learning rate the server chose (and, for
FedProx, with the proximal term it asked for)."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from flowertune_llm.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

# Paging moves optimizer state between GPU and host memory; without a GPU the unpaged twin does the same math.
_UNPAGED = {
    "paged_adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "adamw_torch",
    "paged_lion_8bit": "lion_8bit",
    "paged_lion_32bit": "lion_32bit",
    "paged_ademamix_8bit": "ademamix_8bit",
    "paged_ademamix_32bit": "ademamix",
}


@dataclass(frozen=True)
class RoundResult:
    train_loss: float
    num_examples: int  # the partition size: FedAvg's weight for this client
    steps: int
    tokens: int  # trained on: padding left out
    padded_tokens: int  # every position of every batch
    prepare_seconds: float  # building the trainer: tokenization on a first round, checks after
    seconds: float  # the whole of trainer.train(): set-up, batches and optimizer steps
    step_seconds: float  # the optimizer steps alone (forward, backward, update), summed


class _StepTimer(TrainerCallback):
    """Sums the time between each step's begin and end: what a round spends on the math itself."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._started


def optimizer_name(optim: str, on_gpu: bool) -> str:
    if on_gpu or optim not in _UNPAGED:
        return optim
    return _UNPAGED[optim]


def checkpointing_kwargs(model: ModelConfig) -> dict | None:
    """Reentrant activation checkpointing for an 8-bit model, transformers' default (non-reentrant) otherwise.

    bitsandbytes' LLM.int8() matmul on a GPU (``MatMul8bitLt``) keeps its input for backward as a plain ``ctx``
    attribute, not through ``save_for_backward``. Non-reentrant checkpointing only drops what goes through
    ``save_for_backward``, so every 8-bit linear layer kept its (float32) input alive until backward: on the
    OpenLLaMA-3B shape (H100, batch 16 x 512) 29.4 GB allocated against 10.7 GB reserved in 4-bit
    (../shared/docs/gpu-notes.md). Reentrant checkpointing runs the first forward without autograd, so nothing
    is kept; the recompute holds one layer's inputs at a time. 4-bit keeps only its (resident) weight that way.
    """
    if model.gradient_checkpointing and model.quantization == 8:
        return {"use_reentrant": True}
    return None


def sft_config(train: TrainConfig, model: ModelConfig, learning_rate: float, server_round: int, output_dir: str) -> SFTConfig:
    args = train.training_arguments
    on_gpu = torch.cuda.is_available() and model.device_map != "cpu"
    return SFTConfig(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The server's schedule moves the rate between rounds; within a round it stays put.
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=optimizer_name(args.optim, on_gpu),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_length=train.seq_length,
        completion_only_loss=True,
        activation_checkpointing=model.gradient_checkpointing,
        activation_checkpointing_kwargs=checkpointing_kwargs(model),
        bf16=on_gpu and model.dtype == "bfloat16",
        fp16=on_gpu and model.dtype == "float16",
        use_cpu=not on_gpu,
        # A new seed each round, so a client sees a fresh sample of its partition instead of the same batches.
        seed=train.seed + server_round,
        # PyTorch's deterministic algorithms and cuBLAS's fixed workspace (HF's enable_full_determinism), at a
        # cost in speed on a GPU; CPU runs repeat bit for bit without it.
        full_determinism=train.deterministic,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


datasets.disable_progress_bars()
# The trainer saves nothing (save_strategy="no") but wants an output directory, and creates it: one shared,
# always-empty directory rather than a new temporary one per process that a killed process would leave behind.
_UNUSED_OUTPUT_DIR = str(Path(tempfile.gettempdir()) / "flowertune-llm-trainer-unused")
# TRL tokenizes a prompt/completion dataset when a trainer is built; keep the result for later rounds.
_tokenized: dict[tuple[int, int], tuple[Dataset, Dataset]] = {}


class RoundTrainer(SFTTrainer):
    """TRL's trainer for one round: it counts the tokens it trains on with and without padding, and adds
    FedProx's term (mu/2)·||w - w_global||² over the trainable (adapter) weights when asked.

    Tokens: ``tokens`` are the real ones (attention mask set), ``padded_tokens`` every position of every batch;
    their ratio is what padding costs (transformers counts one or the other, ``include_num_input_tokens_seen``).

    ``w_global`` is a detached copy of the adapter as the round began (:meth:`anchor`): the adapter only,
    never the model (FedProx implementations that deep-copy the model hold a second base model).

    The term enters the gradient, not the reported loss: ``term - term.detach()`` is zero in value, so
    ``train_loss`` stays the task's loss and compares across strategies. It is added once per optimizer
    step: Trainer divides each micro-batch's loss by the accumulation steps unless the model already
    normalised it by the batch's token count, and the term is scaled to match either way.
    """

    def __init__(self, *args, proximal_mu: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.proximal_mu = proximal_mu
        self._anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.tokens = self.padded_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.get("input_ids")
        if ids is not None:
            mask = inputs.get("attention_mask")
            self.padded_tokens += ids.numel()
            self.tokens += int(mask.sum()) if mask is not None else ids.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def anchor(self) -> None:
        """Take the trainable weights as they are now as ``w_global`` (after any dtype change of the adapter)."""
        self._anchors = [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad]

    def proximal_term(self) -> torch.Tensor:
        terms = [torch.sum((p - anchor) ** 2) for p, anchor in self._anchors]
        return (self.proximal_mu / 2) * torch.stack(terms).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # return_outputs passed through as asked: TRL recomputes the logits with a second forward pass for it.
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self.model.training and self._anchors):
            return result
        loss = result[0] if return_outputs else result
        term = self.proximal_term().to(loss.device)
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            term = term / self.current_gradient_accumulation_steps
        loss = loss + (term - term.detach())
        return (loss, *result[1:]) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        # Trainer.training_step's own test (transformers 5): True when it will NOT divide by the accumulation steps.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)


def _remove_input_require_grads_hooks(model: PeftModel) -> None:
    # Every trainer built with gradient checkpointing adds a forward hook on the input embeddings and never
    # removes it; across hundreds of rounds they pile up.
    hooks = model.get_input_embeddings()._forward_hooks
    for handle_id, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") in ("make_inputs_require_grad", "make_inputs_require_grads"):
            del hooks[handle_id]


def train_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    train: TrainConfig,
    model_config: ModelConfig,
    learning_rate: float,
    server_round: int,
    proximal_mu: float = 0.0,
) -> RoundResult:
    trainer, prepare_seconds = build_trainer(model, tokenizer, dataset, train, model_config, learning_rate,
                                             server_round, proximal_mu)  # fmt: skip
    step_timer = _StepTimer()
    trainer.add_callback(step_timer)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    _remove_input_require_grads_hooks(model)
    return RoundResult(
        train_loss=float(output.training_loss),
        num_examples=len(dataset),
        steps=trainer.state.global_step,
        tokens=trainer.tokens,
        padded_tokens=trainer.padded_tokens,
        prepare_seconds=prepare_seconds,
        seconds=seconds,
        step_seconds=step_timer.seconds,
    )


def build_trainer(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, train: TrainConfig,
    model_config: ModelConfig, learning_rate: float, server_round: int, proximal_mu: float = 0.0,
) -> tuple[RoundTrainer, float]:  # fmt: skip
    """The round's trainer (tokenized data cached across rounds), and the seconds it took to build."""
    cache_key = (id(dataset), train.seq_length)
    cached = _tokenized.get(cache_key)
    train_dataset = cached[1] if cached and cached[0] is dataset else dataset

    prepare_start = time.perf_counter()
    trainer = RoundTrainer(
        model=model,
        args=sft_config(train, model_config, learning_rate, server_round, _UNUSED_OUTPUT_DIR),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        proximal_mu=proximal_mu,
    )
    # The round's loss is reported once by the caller; per-step dict prints would drown the federation's log.
    trainer.remove_callback(PrinterCallback)
    _tokenized[cache_key] = (dataset, trainer.train_dataset)
    # SFTTrainer casts a quantized model's adapter to bf16; the federation exchanges and averages float32.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if proximal_mu > 0:
        trainer.anchor()  # w_global: the adapter the server sent, as it will be trained (float32)
    return trainer, time.perf_counter() - prepare_start


def held_out_loss(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, train: TrainConfig, model_config: ModelConfig
) -> float:
    """The mean completion-only loss over ``dataset``, tokenized and batched exactly as training does."""
    cache_key = (id(dataset), train.seq_length)
    cached = _tokenized.get(cache_key)
    eval_dataset = cached[1] if cached and cached[0] is dataset else dataset
    args = sft_config(train, model_config, 0.0, 0, _UNUSED_OUTPUT_DIR)
    args.per_device_eval_batch_size = train.training_arguments.per_device_train_batch_size
    # TRL wants a train dataset even to evaluate; the same one, so it is tokenized once (and cached after).
    trainer = SFTTrainer(model=model, args=args, train_dataset=eval_dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    _tokenized[cache_key] = (dataset, trainer.eval_dataset)
    loss = trainer.evaluate()["eval_loss"]
    _remove_input_require_grads_hooks(model)
    return float(loss)
