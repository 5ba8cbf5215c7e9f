"""PromptModel: a frozen Hugging Face causal LM plus a bank of soft-prompt adapters.

Forward paths for virtual-token methods (prompt tuning, P-tuning, MPT):
- "shared_prefix": the prompt of each distinct (adapter, task) in the batch runs through the backbone once,
  in the same pass as the rows (packed into one sequence); every row's attention reads its prompt's keys
  and values of the layer by task id (ARCHITECTURE.md, "One idea"). Equal to concatenation when the backbone
  has no dropout.
- "concat": PEFT's way: the prompt is placed before every row's tokens (`fastprompt.ops.prompt_embed`).
- "auto" (default): the cheaper of the two for the batch's shape by `path_costs`
  (`fastprompt/path_choice.py`), a cost model of B, T, P and the number of distinct prompts.
Prefix tuning always reads its keys/values from the bank.

Which row reads which bank entry (`BankPlan`, `plan`) is `fastprompt/routing.py`; filling a config from the
model is `fastprompt.methods.resolve_config`; choosing the class for a model (`get_peft_model`,
`from_pretrained`) is `fastprompt/wrap.py`, above this module and its encoder and encoder-decoder subclasses.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from fastprompt import bank, io
from fastprompt.backbones import AttentionContext, get_backbone, patches
from fastprompt.backbones.attention import packed_attention_mask
from fastprompt.inputs import check_model_inputs
from fastprompt.methods import build_source, load_source, resolve_config
from fastprompt.ops import linear_cross_entropy, prompt_embed_unchecked, rows_of
from fastprompt.path_choice import PATHS
from fastprompt.planner import ForwardPlan, ForwardPlanner
from fastprompt.routing import BankPlan, BankRouting


class PromptModel(BankRouting, nn.Module):
    """A drop-in for PEFT's prompt-learning models on causal decoders (see the README for the API)."""

    kind = "causal"  # the backbone kind this class wraps (subclasses: "seq2seq", "encoder")

    def __init__(self, base_model: nn.Module, config=None, adapter_name: str = "default", *,
                 path: str = "auto", backend: str | None = None, fused_ops: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.base_model = base_model
        self.backbone = get_backbone(base_model)
        if self.backbone.kind != self.kind:
            raise ValueError(f"{type(self).__name__} wraps {self.kind} models; {type(base_model).__name__} is "
                             f"{self.backbone.kind}: use fastprompt.get_peft_model, which picks the class")
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.prompt_sources = nn.ModuleDict()
        self.peft_config: dict = {}
        self.path = path
        self.backend = backend
        self.active_adapter: str | None = None
        self._plans: dict[tuple, BankPlan] = {}  # `plan`'s cache, by routing inputs; emptied on adapter changes
        self.planner = ForwardPlanner(self.backbone)  # each shape's forward decisions (fastprompt/planner.py)
        # Instance patches of the frozen backbone (backbones/patches.py), undone by `unpatch()`.
        self._frozen_ops = patches.patch_frozen_ops(self.backbone, backend) if fused_ops else None
        self._checkpointing = None
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()
        if config is not None:
            self.add_adapter(adapter_name, config)

    # backbone patches ------------------------------------------------------------------------
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer's activations in the backward (works with the shared-prefix path
        and prefix tuning). `gradient_checkpointing_kwargs` is accepted for transformers.Trainer; only
        {"use_reentrant": False} (the default here) is supported."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs={'use_reentrant': True} is not supported: "
                             "fastprompt checkpoints non-reentrantly so gradients reach the prompt bank")
        if self._checkpointing is None:
            self._checkpointing = patches.checkpoint_layers(self.backbone)

    def gradient_checkpointing_disable(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.undo()
            self._checkpointing = None

    def unpatch(self) -> None:
        """Give the base model back as it came: undo the fused-ops and checkpointing patches."""
        self.gradient_checkpointing_disable()
        if self._frozen_ops is not None:
            self._frozen_ops.undo()
            self._frozen_ops = None

    # adapters --------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompt_sources)

    def add_adapter(self, adapter_name: str, config) -> None:
        """Add a freshly initialised adapter to the bank (its parameters train in fp32)."""
        if adapter_name in self.prompt_sources:
            raise ValueError(f"adapter_name={adapter_name!r} is already loaded")
        config = resolve_config(config, self.backbone)
        source = build_source(config, self.backbone).to(self.backbone.device)
        for param in source.parameters():
            param.requires_grad_(not config.inference_mode)
        self._register(adapter_name, source, config)

    def _register(self, adapter_name: str, source, config) -> None:
        self.prompt_sources[adapter_name] = source
        self.peft_config[adapter_name] = config
        self._plans.clear()
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def load_adapter(self, adapter_dir, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Load a PEFT or fastprompt adapter folder into the bank under `adapter_name`."""
        if adapter_name in self.prompt_sources:
            raise ValueError(f"adapter_name={adapter_name!r} is already loaded")
        config, source = load_source(adapter_dir, self.backbone)  # raises before anything is added
        config.inference_mode = not is_trainable
        source.requires_grad_(is_trainable)
        self._register(adapter_name, source, config)

    def set_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name, "adapter_name")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name, "adapter_name")
        if len(self.prompt_sources) == 1:
            raise ValueError("cannot delete the only adapter")
        del self.prompt_sources[adapter_name]
        del self.peft_config[adapter_name]
        self._plans.clear()
        if self.active_adapter == adapter_name:
            self.active_adapter = self.adapter_names[0]

    @property
    def active_peft_config(self):
        return self.peft_config[self.active_adapter]

    def _check_adapter(self, name: str, argument: str) -> None:
        if name not in self.prompt_sources:
            raise ValueError(f"{argument}={name!r} is not a loaded adapter; loaded: {self.adapter_names}")

    # checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None) -> None:
        """PEFT's layout: the "default" adapter at the root, others in subfolders named after them. All or
        nothing (`io.atomic_folder`): the folder holds this save's adapters or the previous save's."""
        with io.atomic_folder(save_directory) as folder:
            for name in selected_adapters or self.adapter_names:
                self._check_adapter(name, "selected_adapters")
                config = {**self.peft_config[name].to_dict(), "inference_mode": True}
                io.save_adapter(io.adapter_folder(folder, name), config, self.prompt_sources[name].peft_state_dict())

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_sources[adapter_name].peft_state_dict()["prompt_embeddings"].cpu()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # the bank --------------------------------------------------------------------------------
    def _plan_sources(self, plan: BankPlan) -> list:
        return [(self.prompt_sources[name], entries) for name, entries in plan.sources]

    def bank_prompts(self, plan: BankPlan) -> torch.Tensor:
        """Virtual-token embeddings of the plan's entries: [n_entries, P, d] in the backbone's dtype."""
        return bank.entry_prompts(self._plan_sources(plan), self.backbone.dtype, self.backend)

    def bank_kv(self, plan: BankPlan):
        """(keys, values, last_hidden): per-layer prefix keys/values of the plan's entries, each
        [n_entries, Hkv, P, D], and the last virtual token's final hidden state [n_entries, d] or None
        (`fastprompt.bank.entry_kv`: prefix tuning's parameters, or the prompt pass)."""
        return bank.entry_kv(self.backbone, self._plan_sources(plan), self.backend)

    # forward ---------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, adapter_names=None,
                inputs_embeds=None, position_ids=None, path: str | None = None, return_dict: bool = True,
                return_logits: bool | None = None, **kwargs):
        """Loss and logits of the input tokens ([B, T, V]; virtual tokens get no logits).

        input_ids [B, T] (or inputs_embeds [B, T, d]); attention_mask [B, T] (1 = token, right or left
        padding); labels [B, T] (-100 = ignore); rows pick adapters by `adapter_names` (list of B names)
        or `task_ids` (int64 [B]: the MPT task, or for other methods the index of a loaded adapter).

        return_logits: None (default) gives logits unless a loss is computed with grad mode on (a training
        step: the loss comes from the fused LM head + cross-entropy and no [B, T, V] logits are held);
        True or False forces either.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # transformers.Trainer's accumulation
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported by fastprompt's forward")
        if kwargs:
            raise ValueError(f"unexpected arguments to PromptModel.forward: {sorted(kwargs)}")
        hidden, last_virtual = self._hidden(input_ids, inputs_embeds, attention_mask, labels, task_ids,
                                            adapter_names, position_ids, path)
        if return_logits is None:
            return_logits = labels is None or not torch.is_grad_enabled()
        loss = None
        if labels is not None:
            loss = self.lm_loss(hidden, last_virtual, labels, num_items_in_batch)
        logits = self.backbone.lm_head(hidden) if return_logits else None
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        return output if return_dict else output.to_tuple()

    def hidden_states(self, input_ids=None, attention_mask=None, task_ids=None, adapter_names=None,
                      inputs_embeds=None, path: str | None = None):
        """Final hidden states of the input tokens, the LM head's input: (hidden [B, T, d], last_virtual
        [B, d] or None) in the backbone's dtype. last_virtual is each row's last virtual token's state (it
        predicts the first input token; None for prefix tuning). Arguments as in `forward`; the LM head
        of them gives forward's logits, and `lm_loss` of them its loss."""
        return self._hidden(input_ids, inputs_embeds, attention_mask, None, task_ids, adapter_names, None, path)

    def lm_loss(self, hidden: torch.Tensor, last_virtual: torch.Tensor | None, labels: torch.Tensor,
                num_items_in_batch=None) -> torch.Tensor:
        """Next-token cross-entropy through the frozen LM head, fused (`ops.linear_cross_entropy`).

        hidden [B, T, d] of the input tokens; last_virtual [B, d] (the last virtual token's hidden state,
        which as in PEFT predicts the first input token) or None; labels [B, T] int64 (-100 = ignore).
        Mean over the counted targets, or their sum / num_items_in_batch. Returns an fp32 scalar.
        """
        if last_virtual is not None:
            predictors, targets = torch.cat([last_virtual[:, None], hidden[:, :-1]], dim=1), labels
        else:
            predictors, targets = hidden[:, :-1], labels[:, 1:]
        head = self.backbone.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        device_type = predictors.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else weight.dtype)
        loss = linear_cross_entropy(predictors.to(dtype), weight.to(dtype), targets.to(predictors.device),
                                    bias=None if bias is None else bias.to(dtype),
                                    reduction="mean" if num_items_in_batch is None else "sum",
                                    backend=self.backend)
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    def _hidden(self, input_ids, inputs_embeds, attention_mask, labels, task_ids, adapter_names, position_ids,
                path):
        """The walk of every forward, down once: check the inputs, resolve the routing (`plan`), take the
        shape's plan (`self.planner`), run its path. Returns (hidden [B, T, d], last_virtual [B, d] or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, d]")
        check_model_inputs(self, input_ids, task_ids, adapter_names)
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape [B={B}, T={T}], got {tuple(t.shape)}")
        routing = self.plan(B, task_ids, adapter_names)
        attention_mask = _without_padding(attention_mask)
        plan = self.planner.plan(routing, T, path or self.path, attention_mask is not None, self.backend)
        if plan.path == "concat":
            return self._concat_hidden(routing, plan, input_ids, inputs_embeds, attention_mask)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        if routing.kind == "tokens":
            if position_ids is not None:
                warnings.warn("position_ids are ignored for virtual-token methods (as in PEFT)")
            return self._packed_hidden(routing, plan, input_ids, inputs_embeds, key_padding_mask)
        return self._prefix_hidden(routing, plan, input_ids, inputs_embeds, key_padding_mask, position_ids)

    def _concat_hidden(self, routing: BankPlan, plan: ForwardPlan, input_ids, inputs_embeds, attention_mask):
        """PEFT's path: each row's prompt before its tokens (ids checked by the forward, rows by routing)."""
        prompts = self.bank_prompts(routing)
        P = prompts.shape[1]
        if input_ids is not None:
            embeds = prompt_embed_unchecked(input_ids, self.backbone.word_embeddings.weight, prompts,
                                            routing.bank_rows, backend=plan.backend)
        else:
            embeds = torch.cat([rows_of(prompts, routing.bank_rows).to(inputs_embeds.dtype), inputs_embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1)
        hidden = self.backbone.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask)
        return hidden[:, P:], hidden[:, P - 1]

    def _prefix_hidden(self, routing: BankPlan, plan: ForwardPlan, input_ids, inputs_embeds, key_padding_mask,
                       position_ids):
        """Prefix tuning: every row reads its entry's per-layer keys/values from the bank."""
        keys, values, _ = self.bank_kv(routing)
        position_ids = plan.position_ids if position_ids is None else position_ids + routing.num_virtual_tokens
        ctx = AttentionContext("prefix", keys, values, routing.bank_rows, backend=plan.backend,
                               key_padding_mask=key_padding_mask, row_route=plan.row_route)
        hidden = self.backbone.hidden_states(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                             position_ids=position_ids, ctx=ctx)
        return hidden, None

    def _packed_hidden(self, routing: BankPlan, plan: ForwardPlan, input_ids, inputs_embeds, key_padding_mask):
        """The shared-prefix path of virtual-token methods in one backbone pass: the routing's n distinct
        prompts [n, P, d] and the B rows [B, T, d] travel as one sequence [1, n·P + B·T, d] (`AttentionContext`
        mode "packed"), prompts at positions 0..P-1, rows at P..P+T-1. Returns (hidden [B, T, d], last_virtual
        [B, d]: the last virtual token's state of each row's prompt)."""
        prompts = self.bank_prompts(routing)
        n, P, d = prompts.shape
        if inputs_embeds is None:
            inputs_embeds = self.backbone.word_embeddings(input_ids)
        B, T = inputs_embeds.shape[:2]
        embeds = torch.cat([prompts.reshape(1, n * P, d).to(inputs_embeds.dtype),
                            inputs_embeds.reshape(1, B * T, d)], dim=1)
        mask = plan.packed_mask
        if plan.needs_packed_mask:  # several prompts or padded keys: the mask reads this batch's rows
            mask = packed_attention_mask(n, P, B, T, routing.bank_rows, key_padding_mask, torch.float32)
        ctx = AttentionContext("packed", bank_rows=routing.bank_rows, key_padding_mask=key_padding_mask,
                               backend=plan.backend, packed=(n, P, B, T), packed_mask=mask,
                               row_route=plan.row_route, prompt_route=plan.prompt_route)
        hidden = self.backbone.hidden_states(inputs_embeds=embeds, position_ids=plan.position_ids, ctx=ctx)
        prompt_hidden, row_hidden = hidden.squeeze(0).split([n * P, B * T])
        # each row's prompt's last virtual state (one prompt: expanded, its backward a sum, not a scatter)
        return row_hidden.view(B, T, d), rows_of(prompt_hidden.view(n, P, d)[:, -1], routing.bank_rows)

    # generation ------------------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, adapter_names=None, **kwargs):
        """Generate continuations; returns [B, T + new] token ids (virtual tokens never appear).

        kwargs: max_new_tokens, do_sample, temperature, top_k, top_p, seed (or generator),
        eos_token_id, pad_token_id. See `fastprompt.generation.generate`.
        """
        from fastprompt.generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, task_ids=task_ids,
                        adapter_names=adapter_names, **kwargs)


def _without_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """attention_mask [B, T], or None when it hides nothing, so that attention takes its unmasked (fused
    causal) route and nobody builds a mask; read only where that is free: not on CUDA (a host sync, as in
    HF's own SDPA mask) and not while torch.compile traces (a data-dependent branch)."""
    if (attention_mask is None or attention_mask.is_cuda or torch.compiler.is_compiling()
            or not bool(attention_mask.all())):
        return attention_mask
    return None
