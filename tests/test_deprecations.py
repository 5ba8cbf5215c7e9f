"""fastprompt's own paths raise no deprecation warning from the transformers they run on (transformers 5.25
renamed the forward's `past_key_values` to `cache`). pytest.ini ignores the warnings PEFT's prefix tuning
raises there, in the tests that compare with PEFT; these tests turn every FutureWarning and
DeprecationWarning back into an error for fastprompt's own forward, backward and generate."""

import warnings
from contextlib import contextmanager

import pytest

import fastprompt
from tests.backbones import tiny_bidirectional
from tests.backbones.tiny_bidirectional import tiny
from tests.tiny_models import batch, tiny_model

CONFIGS = {
    "prefix": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=3),
}


@contextmanager
def _strict():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_paths_raise_no_deprecation(family, method):
    model = fastprompt.get_peft_model(tiny_model(family), CONFIGS[method]())
    ids, mask, labels = batch(padding="left")
    with _strict():
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.generate(ids, attention_mask=mask, max_new_tokens=3)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_paths_raise_no_deprecation(family, method):
    model = fastprompt.get_peft_model(tiny(family), {**CONFIGS[method]().to_dict(), "task_type": "SEQ_2_SEQ_LM"})
    ids, mask = tiny_bidirectional.batch()
    labels, decoder_mask = tiny_bidirectional.targets()
    with _strict():
        model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask).loss.backward()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_encoder_paths_raise_no_deprecation(method):
    model = fastprompt.get_peft_model(tiny("bert_mlm"), {**CONFIGS[method]().to_dict(),
                                                         "task_type": "FEATURE_EXTRACTION"})
    ids, mask = tiny_bidirectional.batch()
    with _strict():
        model(input_ids=ids, attention_mask=mask)
