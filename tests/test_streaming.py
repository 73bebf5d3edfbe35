"""vqgen.data.streaming: reader plans (disjoint, covering, equal), the streamed dataset, resume skips, HF streams."""

import io

import pytest
import torch
from PIL import Image

from vqgen.data import stream_input
from vqgen.data.streaming import UNREADABLE, StreamedImages, contiguous_pieces, plan_readers, rank_batches, worker_skips
from vqgen.errors import ConfigError


def make_tars(root, sizes, size=12, bad=()):
    """WebDataset shards with ``sizes[i]`` samples each; labels = global index; keys in ``bad`` get junk bytes."""
    import webdataset as wds
    root.mkdir(parents=True, exist_ok=True)
    g = 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"img-{s:04d}.tar")) as w:
            for _ in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (size + g % 3, size), (g % 256, (7 * g) % 256, 0)).save(buf, format="PNG")
                w.write({"__key__": f"{g:08d}", "png": b"junk" if g in bad else buf.getvalue(), "cls": str(g)})
                g += 1
    return f"wds:{root}/img-{{0000..{len(sizes) - 1:04d}}}.tar"


def labels_of(ds, num_workers=0):
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [int(y) for _, y in dl]


@pytest.mark.parametrize("counts,readers", [([5, 3, 9, 1], 3), ([9], 5), ([6, 2], 7), ([10] * 6, 4)])
def test_equal_plans_are_disjoint_equal_and_drop_less_than_readers(counts, readers):
    for epoch in range(2):
        seen, sizes = [], []
        for j in range(readers):
            pieces, n = plan_readers(counts, len(counts), readers, j, seed=3, epoch=epoch, shuffle=True, equal=True)
            got = [(p.shard, i) for p in pieces for i in range(counts[p.shard]) if p.keeps(i)]
            assert len(got) == n and len({p.shard for p in pieces}) == len(pieces)
            seen += got
            sizes.append(n)
        assert len(set(seen)) == len(seen) and len(set(sizes)) == 1
        assert sum(counts) - len(seen) < readers


def test_extraction_plans_cover_everything_exactly_once():
    counts = [5, 3, 9, 1]
    for readers in (1, 2, 3, 8, 30):
        seen = []
        for j in range(readers):
            pieces, n = plan_readers(counts, 4, readers, j, seed=0, epoch=0, shuffle=False, equal=False)
            seen += [(p.shard, i) for p in pieces for i in range(counts[p.shard]) if p.keeps(i)]
        assert sorted(seen) == [(s, i) for s in range(4) for i in range(counts[s])]
    # without counts: one round-robin pass, strided inside shards when shards < readers
    for readers in (2, 4, 9):
        seen = []
        for j in range(readers):
            pieces, n = plan_readers(None, 4, readers, j, seed=0, epoch=0, shuffle=False, equal=False)
            assert n is None and pieces
            seen += [(p.shard, i) for p in pieces for i in range(counts[p.shard]) if p.keeps(i)]
        assert sorted(seen) == [(s, i) for s in range(4) for i in range(counts[s])]


def test_unknown_length_needs_samples_per_epoch():
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        plan_readers(None, 3, 2, 0, seed=0, epoch=0, shuffle=True, equal=True)
    pieces, n = plan_readers(None, 3, 8, 5, seed=0, epoch=0, shuffle=True, equal=True, samples_per_epoch=80)
    assert n == 10 and len(pieces) == 1


def test_contiguous_pieces_open_only_overlapping_shards():
    assert [(p.shard, p.start, p.stop) for p in contiguous_pieces([5, 3, 9], [2, 0, 1], 7, 12)] == [(2, 7, 9), (0, 0, 3)]


def test_stream_two_ranks_two_workers_disjoint_equal_and_worker_count_checked(tmp_path):
    spec = make_tars(tmp_path / "s", [7, 5, 6])
    src, dec, info = stream_input.open_stream(spec, "train", "data", 8, 3)
    assert src.counts == [7, 5, 6] and info.transforms["total"] == 18
    assert (tmp_path / "s" / stream_input.COUNTS_FILE).is_file()           # counted once, cached beside the data
    per_rank = []
    for rank in range(2):
        ds = StreamedImages(src, dec, rank=rank, world_size=2, num_workers=2, seed=1, epoch=0, shuffle_buffer=4)
        assert ds.per_worker == 4 and rank_batches(ds.per_worker, 2, 3) == 4
        per_rank.append(labels_of(ds, num_workers=2))
    assert len(per_rank[0]) == len(per_rank[1]) == 8 and not set(per_rank[0]) & set(per_rank[1])
    again = labels_of(StreamedImages(src, dec, rank=0, world_size=2, num_workers=2, seed=1, epoch=0, shuffle_buffer=4),
                      num_workers=2)
    other_epoch = labels_of(StreamedImages(src, dec, rank=0, world_size=2, num_workers=2, seed=1, epoch=1,
                                           shuffle_buffer=4), num_workers=2)
    assert again == per_rank[0] and other_epoch != per_rank[0]
    with pytest.raises(RuntimeError, match="planned for 2 workers"):
        labels_of(StreamedImages(src, dec, num_workers=2), num_workers=1)


def test_resume_skips_give_exactly_the_remaining_batches(tmp_path):
    spec = make_tars(tmp_path / "s", [9, 4, 8, 3])
    src, dec, _ = stream_input.open_stream(spec, "train", "data", 8, 3)
    kw = dict(rank=1, world_size=2, num_workers=2, seed=5, epoch=2, shuffle_buffer=3)
    full = StreamedImages(src, dec, **kw)
    b = 2
    dl = torch.utils.data.DataLoader(full, batch_size=b, num_workers=2)
    batches = [y.tolist() for _, y in dl]
    assert len(batches) == rank_batches(full.per_worker, 2, b)
    for done in range(len(batches) + 1):
        part = StreamedImages(src, dec, skip=worker_skips(done, 2, b, full.per_worker), first_worker=done, **kw)
        rest = [y.tolist() for _, y in torch.utils.data.DataLoader(part, batch_size=b, num_workers=2)]
        assert rest == batches[done:], done


def test_samples_per_epoch_cycles_and_fewer_shards_than_readers(tmp_path):
    spec = make_tars(tmp_path / "s", [3, 2])
    src, dec, _ = stream_input.open_stream(spec, "train", "data", 8, 3)
    src.counts = None  # as for a remote / unknown-length stream
    got = [labels_of(StreamedImages(src, dec, rank=r, world_size=3, num_workers=0, samples_per_epoch=21,
                                    shuffle_buffer=1)) for r in range(3)]
    assert [len(g) for g in got] == [7, 7, 7]
    assert set(got[0]) | set(got[1]) | set(got[2]) == set(range(5))


def test_unreadable_sample_is_marked_not_dropped(tmp_path):
    spec = make_tars(tmp_path / "s", [4, 4], bad={2})
    src, dec, _ = stream_input.open_stream(spec, "train", "data", 8, 3)
    with pytest.warns(UserWarning, match="unreadable image"):
        items = list(StreamedImages(src, dec, shuffle=False))
    assert [y for _, y in items] == [0, 1, UNREADABLE, 3, 4, 5, 6, 7]


def test_augmentation_is_seeded_per_sample(tmp_path):
    from vqgen.data.augment import Augment
    spec = make_tars(tmp_path / "s", [6])
    src, dec, _ = stream_input.open_stream(spec, "train", "data", 8, 3)
    aug = Augment(8, random_crop=True, hflip=True)
    a = [x for x, _ in StreamedImages(src, dec, seed=1, augment=aug, shuffle=False)]
    b = [x for x, _ in StreamedImages(src, dec, seed=1, augment=aug, shuffle=False)]
    c = [x for x, _ in StreamedImages(src, dec, seed=1, epoch=1, augment=aug, shuffle=False)]
    plain = [x for x, _ in StreamedImages(src, dec, seed=1, shuffle=False)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, plain)) and a[0].shape == plain[0].shape


def test_hf_stream_from_local_parquet_files(tmp_path):
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcdef"))})
    (tmp_path / "hf").mkdir()
    for f in range(3):
        imgs = [Image.new("RGB", (9, 9), (10 * i, 0, 0)) for i in range(4)]
        datasets.Dataset.from_dict({"image": imgs, "label": [f * 2 + i % 2 for i in range(4)]},
                                   features=feats).to_parquet(str(tmp_path / "hf" / f"train-{f}.parquet"))
    src, dec, info = stream_input.open_stream(f"hf:{tmp_path / 'hf'}", "train", "data", 8, 3, streaming_hf=True)
    assert len(src.names) == 3 and info.num_classes == 6
    got = [labels_of(StreamedImages(src, dec, rank=r, world_size=2, samples_per_epoch=8, shuffle_buffer=2),
                     num_workers=2 if False else 0) for r in range(2)]
    assert [len(g) for g in got] == [4, 4]
    extraction = [labels_of(StreamedImages(src, dec, rank=r, world_size=2, equal=False, shuffle=False))
                  for r in range(2)]
    assert sorted(extraction[0] + extraction[1]) == sorted(f * 2 + i % 2 for f in range(3) for i in range(4))


def test_any_split_name_extracts_and_reads_back(tmp_path, capsys):
    """--split val (ImageNet's name) is extracted under that name and read by the token reader."""
    from factories import tiny_vqvae
    from vqgen import extract, shards
    from vqgen.cli import run_cli
    from vqgen.config import ExtractConfig
    tiny_vqvae().export_to(tmp_path / "tok")
    argv = ["--checkpoint", str(tmp_path / "tok"), "--dataset", "digits", "--data_dir", str(tmp_path / "data"),
            "--output", str(tmp_path / "sh"), "--split", "val", "--no_progress"]
    assert run_cli(extract.run, ExtractConfig, argv) == 0
    man = shards.Manifest.read(tmp_path / "sh")
    assert list(man.splits) == ["val"] and man.splits["val"].total == 297 and man.splits["val"].order_seed == 0
    n = sum(len(t) for t, _ in shards.make_token_loader(tmp_path / "sh", "val", batch_size=64, shuffle=False))
    assert n == 297
    capsys.readouterr()
    assert run_cli(extract.run, ExtractConfig, [*argv[:-3], "--split", "bad-name"]) == 2
    assert "split names are letters, digits and _" in capsys.readouterr().err
