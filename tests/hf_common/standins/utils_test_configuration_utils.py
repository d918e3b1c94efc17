"""Stand-in for transformers' `tests/utils/test_configuration_utils.py` (not in the sdist).

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks that every key reads
back with its value: common `PreTrainedConfig` arguments, each set to a non-default value.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",  # ConfigTester compares this one with torch.float16
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["AttnVariantLlamaForCausalLM"],
    "id2label": {0: "negative", 1: "neutral", 2: "positive"},
    "label2id": {"negative": 0, "neutral": 1, "positive": 2},
    "problem_type": "multi_label_classification",
    "tie_word_embeddings": False,
    "pad_token_id": 7,
    "bos_token_id": 5,
    "eos_token_id": 6,
}
