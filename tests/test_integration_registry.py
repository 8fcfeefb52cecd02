"""The architecture registry is the one list of supported models: the tests' lists come from it,
and every entry has a tiny model that patches and matches the unpatched model."""
import tiny_models as tm
from ptkernels.integrations.architectures import ARCHITECTURES, FAMILIES, SUPPORTED, of_family


def test_every_registered_architecture_has_a_tiny_model():
    assert set(tm.CONFIGS) == set(SUPPORTED)
    assert set(tm.ALL) == set(SUPPORTED) and len(tm.ALL) == len(SUPPORTED)


def test_families_partition_the_registry():
    assert tm.DECODERS == of_family("decoder")
    assert tm.ENCODERS == of_family("encoder")
    assert tm.SEQ2SEQ == of_family("seq2seq")
    assert sorted(a.model_type for entries in FAMILIES.values() for a in entries) == list(SUPPORTED)
    for model_type, arch in ARCHITECTURES.items():
        assert arch.model_type == model_type
        assert arch.is_encoder_decoder == (model_type in tm.SEQ2SEQ)


def test_entry_matches_tiny_model_config():
    for model_type, arch in ARCHITECTURES.items():
        cfg = tm.config(model_type)
        assert cfg.model_type == model_type
        hkv, d = arch.heads(cfg)
        assert hkv >= 1 and d >= 1
