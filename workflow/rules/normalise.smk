rule normalise:
    input:
        manifest="results/cutouts/{shard}.parquet",
        shard="results/catalogue/shards/{shard}.parquet",
    output:
        normalised="results/normalised/{shard}.parquet",
        rejects="results/normalised/{shard}.rejects.parquet",
    params:
        cfg=stage_config(config, "normalise"),
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
