import torch

from detect_waste_cls.data.samplers import EpochDrawSampler, inverse_frequency_weights


def imbalanced_targets():
    return [0] * 900 + [1] * 90 + [2] * 10


def test_weighted_sampler_draws_classes_near_uniformly():
    targets = imbalanced_targets()
    sampler = EpochDrawSampler(targets, num_samples=30000, weights=inverse_frequency_weights(targets, 3), seed=1)
    drawn = torch.bincount(torch.tensor(targets)[list(sampler)], minlength=3).double() / 30000
    assert torch.allclose(drawn, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.02)


def test_ranks_get_disjoint_shards_of_one_draw_per_epoch():
    targets = imbalanced_targets()
    weights = inverse_frequency_weights(targets, 3)
    ranks = [EpochDrawSampler(targets, num_samples=1000, weights=weights, num_replicas=3, rank=r, seed=5) for r in range(3)]
    full = ranks[0].draw()
    shards = [list(s) for s in ranks]
    assert all(len(shard) == len(ranks[0]) == 334 for shard in shards)
    assert sorted(sum(shards, [])) == sorted(full.tolist())  # together: exactly the one draw
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != shards  # a new draw each epoch


def test_uniform_draw_cycles_permutations_when_asked_for_more_than_the_dataset():
    sampler = EpochDrawSampler(list(range(10)), num_samples=25, seed=0)
    drawn = list(sampler)
    assert len(drawn) == 25
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))
