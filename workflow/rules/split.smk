rule split:
    input:
        expand(PATHS["normalised"], shard=SHARDS),
    output:
        train=PATHS["split"].format(split="train"),
        validation=PATHS["split"].format(split="validation"),
        test=PATHS["split"].format(split="test"),
        summary=PATHS["split_summary"],
    params:
        cfg=stage_params(CFG, "split"),
    log:
        "logs/split.log",
    benchmark:
        "logs/benchmarks/split.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/split.py"
