rule split:
    input:
        expand(P["normalised"], shard=SHARDS),
    output:
        train=P["split"].format(split="train"),
        validation=P["split"].format(split="validation"),
        test=P["split"].format(split="test"),
        summary=P["split_summary"],
    params:
        cfg=stage_params(CFG, "split"),
        code=CODE["split"],
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{LOGS}/benchmarks/split.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/split.py"
