rule normalise:
    input:
        manifest=PATHS["manifest"],
        shard=PATHS["shard"],
    output:
        normalised=PATHS["normalised"],
        rejects=PATHS["rejects"],
    params:
        cfg=stage_params(CFG, "normalise"),
    log:
        "logs/normalise/{shard}.log",
    benchmark:
        "logs/benchmarks/normalise/{shard}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/normalise.py"
