rule split:
    input:
        expand("results/normalised/{shard}.parquet", shard=SHARDS),
    output:
        train="results/split/train.parquet",
        validation="results/split/validation.parquet",
        test="results/split/test.parquet",
        summary="results/split/summary.json",
    params:
        cfg=stage_config(config, "split"),
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
