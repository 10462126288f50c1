import pytest

from sdstack.models.tokenizer import BOS, EOS, ClipTokenizer

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT, masterpiece, (best quality:1.2), 8k uhd",
    "émoji ✨ and ümlauts — dashes",
    "don't won't it's we're they've I'm you'll he'd",
    "numbers 1234567 and 3.14159",
    "  lots   of\twhitespace\n here  ",
    "a" * 300,
    "&amp; html &lt;escapes&gt;",
]


def test_known_ids():
    # The fact: CLIP ids for "a photo of a cat".
    assert ClipTokenizer()("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_padding_and_truncation():
    t = ClipTokenizer(pad_token_id=0)
    ids = t("a cat")
    assert len(ids) == 77 and ids[:4] == [BOS, 320, 2368, EOS] and set(ids[4:]) == {0}
    long = ClipTokenizer()("cat " * 200)
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tok")
    ClipTokenizer().save_pretrained(d)
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers_clip_tokenizer(hf_tokenizer, text):
    # Independent reference: transformers' CLIPTokenizer reading the same vocabulary files.
    ours = ClipTokenizer().encode(text)
    theirs = hf_tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    assert ours == theirs


def test_decode_round_trip():
    t = ClipTokenizer()
    assert t.decode(t.encode("a red star on a blue background")) == "a red star on a blue background"
