"""saftune inside the Hugging Face stack: one module per integration, each importing its library lazily.

* `peft_export`: a sparse delta as a PEFT adapter directory (`PeftModel.from_pretrained` loads it).
* `lm_eval`: lm-evaluation-harness tasks on a causal-LM result (`saftune eval --harness lm-eval`).
* `hf_trainer`: SAFT phase 1 + 2 inside an unchanged `transformers.Trainer` / `trl.SFTTrainer`.
* `fsdp`: the frozen base sharded with FSDP2 while the selected values are all-reduced.
"""
