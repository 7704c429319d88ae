"""kit.pretrained against transformers itself: tiny checkpoints that transformers
initializes and saves, loaded by the kit, logits and every attention map compared.

    python experiments/against_transformers.py --python=/path/to/venv/bin/python

torch and transformers are never the kit's dependencies: --python names an interpreter
of a throwaway virtual environment that has them (`pip install torch==2.13.0
transformers safetensors`). That interpreter runs this file with --write: it builds
tiny models of each family (random weights, transformers' own initialization),
`save_pretrained`s them (safetensors) and records their outputs on fixed inputs with
output_attentions=True, and GPT-2's greedy `generate`. This interpreter (the kit's)
then loads each folder with `kit.pretrained.load` and prints the largest relative
difference of the logits and of the attention maps (the tolerance is 1e-4), and
whether the generated ids are the same; it saves each model back with
`kit.pretrained.save`, and the torch interpreter (--read) opens those folders in
transformers and compares their logits with its own. Exits 1 if any family is off.
"""

import json
import os
import subprocess
import sys
import tempfile

FAMILIES = ("gpt2", "bert", "bert_base", "vit", "t5_v1_0", "t5_v1_1")
IDS = [[3, 17, 5, 5, 39, 0, 12, 8, 21, 33]]
TYPES = [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]
MASK = [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]  # BERT: the last two tokens are padding
DECODER_IDS = [[0, 7, 7, 30, 2, 11]]  # T5: the start token (0), then any tokens
GENERATE = {"prompt": 4, "new": 8}


def write(root: str) -> None:
    """In the torch environment: save each family's tiny model and its outputs."""
    import numpy as np
    import torch
    import transformers as tf

    torch.manual_seed(0)
    # "eager": the attention transformers can return (its sdpa path returns none).
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=37)
    eager = dict(attn_implementation="eager")
    t5 = dict(
        vocab_size=40,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        eos_token_id=None,
        decoder_start_token_id=0,
    )
    models = {
        "gpt2": tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=40,
                n_positions=16,
                n_embd=32,
                n_layer=2,
                n_head=4,
                bos_token_id=None,
                eos_token_id=None,
                **eager,
            )
        ),
        "bert": tf.BertForMaskedLM(
            tf.BertConfig(vocab_size=40, max_position_embeddings=16, **small, **eager)
        ),
        "bert_base": tf.BertModel(
            tf.BertConfig(vocab_size=40, max_position_embeddings=16, **small, **eager)
        ),
        "vit": tf.ViTForImageClassification(
            tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5, **small, **eager)
        ),
        # v1.0: ReLU, head tied and scaled; v1.1: gated GELU, untied head, and heads whose
        # width is not d_model / num_heads (as t5-v1_1-small's 6 heads of 64 in 512).
        "t5_v1_0": tf.T5ForConditionalGeneration(tf.T5Config(**t5, **eager)),
        "t5_v1_1": tf.T5ForConditionalGeneration(
            tf.T5Config(
                **{**t5, "num_heads": 3, "d_kv": 8},
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                **eager,
            )
        ),
    }
    for name, model in models.items():
        model.eval()
        # transformers' init leaves LayerNorms at 1 and 0 and biases at 0: perturb them
        # so that a swapped weight and bias, or a missing bias, shows.
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith("bias") or "LayerNorm" in key or "layernorm" in key or "ln_" in key:
                    p.add_(0.1 * torch.randn_like(p))
        folder = os.path.join(root, name)
        model.save_pretrained(folder, safe_serialization=True)
        out = {}
        with torch.no_grad():
            if name == "vit":
                pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 8, 8)))
                result = model(pixel_values=pixels.float(), output_attentions=True)
                out["pixel_values"] = pixels.numpy()
            elif name.startswith("t5"):
                result = model(
                    input_ids=torch.tensor(IDS),
                    attention_mask=torch.tensor(MASK),
                    decoder_input_ids=torch.tensor(DECODER_IDS),
                    output_attentions=True,
                )
                ids = model.generate(
                    torch.tensor(IDS),
                    attention_mask=torch.tensor(MASK),
                    max_new_tokens=GENERATE["new"],
                    do_sample=False,
                )
                out["generated"] = ids.numpy()
            elif name.startswith("bert"):
                result = model(
                    input_ids=torch.tensor(IDS),
                    token_type_ids=torch.tensor(TYPES),
                    attention_mask=torch.tensor(MASK),
                    output_attentions=True,
                )
            else:
                result = model(input_ids=torch.tensor(IDS), output_attentions=True)
                prompt = torch.tensor(IDS)[:, : GENERATE["prompt"]]
                ids = model.generate(
                    prompt,
                    max_new_tokens=GENERATE["new"],
                    do_sample=False,
                    pad_token_id=0,
                    attention_mask=torch.ones_like(prompt),
                )
                out["generated"] = ids.numpy()
        if name == "bert_base":
            out["logits"] = result.last_hidden_state.numpy()
            out["pooled"] = result.pooler_output.numpy()
        else:
            out["logits"] = result.logits.numpy()
        if name.startswith("t5"):
            for kind in ("encoder", "decoder", "cross"):
                maps = getattr(result, f"{kind}_attentions")
                out[f"attentions_{kind}"] = np.stack([a.numpy() for a in maps], axis=1)
        else:
            out["attentions"] = np.stack([a.numpy() for a in result.attentions], axis=1)
        np.savez(os.path.join(folder, "outputs.npz"), **out)
    with open(os.path.join(root, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": tf.__version__}, f)


def read(root: str) -> None:
    """In the torch environment: transformers opens the folders the kit saved
    (`kit.pretrained.save`, <family>-kit) and runs the same inputs; prints the largest
    relative difference from its own model's logits, one line per family."""
    import numpy as np
    import torch
    import transformers as tf

    classes = {
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertForMaskedLM,
        "bert_base": tf.BertModel,
        "vit": tf.ViTForImageClassification,
        "t5_v1_0": tf.T5ForConditionalGeneration,
        "t5_v1_1": tf.T5ForConditionalGeneration,
    }
    for name, kind in classes.items():
        want = np.load(os.path.join(root, name, "outputs.npz"))
        model = kind.from_pretrained(os.path.join(root, name + "-kit")).eval()
        with torch.no_grad():
            if name == "vit":
                got = model(pixel_values=torch.from_numpy(want["pixel_values"]).float()).logits
            elif name.startswith("t5"):
                got = model(
                    input_ids=torch.tensor(IDS),
                    attention_mask=torch.tensor(MASK),
                    decoder_input_ids=torch.tensor(DECODER_IDS),
                ).logits
            elif name.startswith("bert"):
                result = model(
                    input_ids=torch.tensor(IDS),
                    token_type_ids=torch.tensor(TYPES),
                    attention_mask=torch.tensor(MASK),
                )
                got = result.last_hidden_state if name == "bert_base" else result.logits
            else:
                got = model(input_ids=torch.tensor(IDS)).logits
        print(json.dumps({"family": name, "error": _relative(got.numpy(), want["logits"])}))


def _relative(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(root: str) -> bool:
    """In the kit's environment: load each folder and compare with transformers' outputs,
    through transformers' own call convention (`kit.hf`): the same keyword arguments,
    `output_attentions=True`, `generate`."""
    import numpy as np

    from kit import pretrained

    with open(os.path.join(root, "versions.json")) as f:
        print("transformers side:", json.load(f))
    ok = True
    for name in FAMILIES:
        folder = os.path.join(root, name)
        want = dict(np.load(os.path.join(folder, "outputs.npz")))
        model = pretrained.load(folder)
        pretrained.save(model, folder + "-kit")  # read back by transformers below
        extra = ""
        if name == "vit":
            out = model(pixel_values=want["pixel_values"], output_attentions=True)
        elif name.startswith("t5"):
            ids, mask = np.array(IDS), np.array(MASK)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=np.array(DECODER_IDS),
                output_attentions=True,
            )
            new = model.generate(ids, attention_mask=mask, max_new_tokens=GENERATE["new"])
            same = np.asarray(new).tolist() == want["generated"].tolist()
            extra = f"  generate {'same ids' if same else 'DIFFERENT ids'}"
            ok &= same
        elif name.startswith("bert"):
            out = model(
                input_ids=np.array(IDS),
                token_type_ids=np.array(TYPES),
                attention_mask=np.array(MASK),
                output_attentions=True,
            )
            if name == "bert_base":  # no head: the last hidden state and the pooler
                out = out.replace(logits=out.last_hidden_state)
                pooled = _relative(out.pooler_output, want["pooled"])
                extra = f"  pooler {pooled:.1e}"
                ok &= pooled < 1e-4
        else:
            ids = np.array(IDS)
            out = model(input_ids=ids, output_attentions=True)
            prompt = ids[:, : GENERATE["prompt"]]
            new = model.generate(prompt, max_new_tokens=GENERATE["new"])
            same = np.asarray(new).tolist() == want["generated"].tolist()
            extra = f"  generate {'same ids' if same else 'DIFFERENT ids'}"
            ok &= same
        if name.startswith("t5"):
            kinds = ("encoder", "decoder", "cross")
            map_error = max(
                _relative(np.stack(getattr(out, f"{k}_attentions"), 1), want[f"attentions_{k}"])
                for k in kinds
            )
            maps = np.stack(out.encoder_attentions, 1)
        else:
            maps = np.stack(out.attentions, 1)
            map_error = _relative(maps, want["attentions"])
        logit_error = _relative(out.logits, want["logits"])
        good = logit_error < 1e-4 and map_error < 1e-4
        ok &= good
        print(
            f"{name:10s} {'ok ' if good else 'OFF'} logits {logit_error:.1e}  "
            f"attention maps {map_error:.1e} ({maps.shape[1]} layers x {maps.shape[2]} heads)"
            f"{extra}"
        )
    return ok


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] in ("--write", "--read"):
        (write if argv[1] == "--write" else read)(argv[2])
        return 0
    python = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--python=")), None)
    if python is None:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as root:
        subprocess.run([python, os.path.abspath(__file__), "--write", root], check=True)
        ok = check(root)
        back = subprocess.run(
            [python, os.path.abspath(__file__), "--read", root],
            check=True,
            capture_output=True,
            text=True,
        )
        print("transformers opening the folders kit.pretrained.save wrote:")
        for line in back.stdout.splitlines():
            row = json.loads(line)
            good = row["error"] < 1e-4
            ok &= good
            print(f"{row['family']:10s} {'ok ' if good else 'OFF'} logits {row['error']:.1e}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
