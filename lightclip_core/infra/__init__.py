"""The bottom layer: storage (local paths and s3://), the distributed world and its collectives, the schema base and
the metric-sink protocol. Everything above may import it; it imports nothing of lightclip_core above itself."""
