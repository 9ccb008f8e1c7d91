#!/usr/bin/env python
"""How the cost per image of EmoVLM-KD and of the one-forward floor grows with the batch size and the class count.

  batch sweep  batch sizes 1 -> 32 (8 Mikels classes);
  class sweep  2 (sentiment), 8 (Mikels) and 32 classes (plausible emotion names). The prompt lists the classes, so
               it grows with them for both contenders; EmoVLM-KD also scores one more trie branch per class.

Both contenders share the VLM weights and the inputs; medians of `--runs` interleaved rounds after `--warmup`.

    python benchmarks/bench_scaling.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_scaling.py --preset qwen2-vl-7b --device cuda --dtype bfloat16 --image-size 500x375 \
        --batch-sizes 1 2 4 8 16 32
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    add_common_arguments,
    build_vlm,
    cap_images,
    check_arguments,
    clock_note,
    count_parameters,
    labels_for,
    machine_info,
    machine_line,
    markdown_table,
    model_line,
    paired_ratio,
    parse_image_size,
    setup,
    size_name,
    spec_dict,
    summarize,
    synthetic_images,
    time_interleaved,
    to_device,
    vlm_floor_call,
    wrap_vlm,
    write_results,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--image-size", type=parse_image_size, default=(224, 224), help="WIDTHxHEIGHT or SIDE")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--class-counts", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--class-sweep-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    counts = [("--batch-sizes", size) for size in args.batch_sizes]
    counts += [("--class-sweep-batch-size", args.class_sweep_batch_size)]
    check_arguments(parser, args, image_sizes=[("--image-size", args.image_size)], counts=counts)
    for count in args.class_counts:
        try:
            labels_for(count)
        except ValueError as error:
            parser.error(f"--class-counts: {error}")
    return args


def measure(model, image_processor, batch_size, args, device, dtype, progress) -> dict:
    images = synthetic_images(batch_size, args.image_size, seed=args.seed + batch_size)
    inputs = to_device(image_processor(cap_images(images, image_processor)[0]), device, dtype)
    contenders = {
        "emovlm_kd": lambda: model(**inputs),
        "vlm_floor": vlm_floor_call(model.vlm, inputs),
    }
    with torch.inference_mode():
        times = time_interleaved(contenders, args.runs, args.warmup, device, progress)
    stats = {name: summarize(times[name], batch_size, args.clock) for name in contenders}
    return {
        "batch_size": batch_size,
        "num_classes": model.config.num_labels,
        "image_tokens": int(inputs["mm_token_type_ids"][0].sum()),
        "prompt_tokens": int(inputs["attention_mask"][0].sum()),
        "trie_nodes": len(model._trie),
        "answer_tokens_total": sum(len(answer) for answer in model.config.answer_token_ids),
        "contenders": stats,
        "emovlm_kd_over_floor": stats["emovlm_kd"]["median_s"] / stats["vlm_floor"]["median_s"],
        "emovlm_kd_over_floor_paired": paired_ratio(times, "emovlm_kd", "vlm_floor", args.clock),
    }


def to_markdown(result: dict) -> str:
    settings = result["settings"]
    size = settings["image_size"]
    # results written before image sizes had a width and a height predate the cap
    resized = "" if isinstance(size, int) else " after the 1024-px cap and the Qwen2-VL resize"
    size = size_name(size)

    def cells(row):
        ours, floor = row["contenders"]["emovlm_kd"], row["contenders"]["vlm_floor"]
        return [f"{ours['ms_per_image']:.1f}", f"{floor['ms_per_image']:.1f}", f"{row['emovlm_kd_over_floor']:.2f}"]

    batch_rows = [[row["batch_size"], *cells(row)] for row in result["batch_sweep"]]
    class_rows = [
        [row["num_classes"], row["prompt_tokens"], row["trie_nodes"], *cells(row)] for row in result["class_sweep"]
    ]
    return "\n\n".join(
        [
            "### Scaling",
            machine_line(result["machine"]),
            model_line(result["model"], settings["dtype"]),
            f"Images of {size} ({result['batch_sweep'][0]['image_tokens']} image tokens{resized}). Times: "
            f"{clock_note(settings['clock'], settings['threads'])}, median of {settings['runs']} interleaved runs "
            f"after {settings['warmup']} warm-up. Batch sweep with 8 classes:",
            markdown_table(["batch", "emovlm_kd ms / image", "floor ms / image", "emovlm_kd / floor"], batch_rows),
            f"Class sweep at batch {settings['class_sweep_batch_size']} (the prompt lists the classes; the trie "
            "holds every answer token once per distinct prefix):",
            markdown_table(
                [
                    "classes",
                    "prompt tokens",
                    "trie nodes",
                    "emovlm_kd ms / image",
                    "floor ms / image",
                    "emovlm_kd / floor",
                ],
                class_rows,
            ),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec, preset, tag = setup(args)
    machine = machine_info(device)
    vlm, processor = build_vlm(spec, device, dtype, args.seed)
    models = {}  # one EmoVLM-KD per label set, all around the same VLM
    for count in sorted(set(args.class_counts) | {8}):
        models[count] = wrap_vlm(vlm, processor, labels_for(count), args.seed)

    calls = 2 * (args.warmup + args.runs) * (len(args.batch_sizes) + len(args.class_counts))
    with tqdm(total=calls, desc="scaling", unit="call") as progress:
        batch_sweep = [measure(*models[8], size, args, device, dtype, progress) for size in args.batch_sizes]
        class_sweep = [
            measure(*models[count], args.class_sweep_batch_size, args, device, dtype, progress)
            for count in args.class_counts
        ]
    result = {
        "benchmark": "scaling",
        "machine": machine,
        "model": {**spec_dict(spec, preset), "parameters": count_parameters(models[8][0])},
        "settings": {
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "image_size": list(args.image_size),
            "runs": args.runs,
            "warmup": args.warmup,
            "class_sweep_batch_size": args.class_sweep_batch_size,
            "labels": {count: labels_for(count) for count in args.class_counts},
        },
        "batch_sweep": batch_sweep,
        "class_sweep": class_sweep,
    }
    json_path, md_path, markdown = write_results(result, to_markdown, args.output_dir, f"scaling_{tag}")
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
