rule cutouts:
    input:
        shard="results/catalogue/shards/{shard}.parquet",
    output:
        manifest="results/cutouts/{shard}.parquet",
    params:
        cfg=stage_config(config, "cutouts"),
        cache_dir=CUTOUT_DIR,
    log:
        "logs/cutouts/{shard}.log",
    benchmark:
        "logs/benchmarks/cutouts/{shard}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/cutouts.py"
