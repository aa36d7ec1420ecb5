"""Data loading for Puppet-CNN: CIFAR-10/100, image folders, splits, tf.data.

Modules (import them directly; this package imports nothing eagerly):

  * `errors`: `DataError`, the single exception for missing/empty/corrupt data.
  * `cifar`: `load_cifar(name, data_dir)` -> uint8 NHWC arrays, from the
    python-pickle archive, its extracted folder, `$PUPPET_CNN_DATA_DIR`, or
    (online) TFDS / Keras.
  * `image_folder`: `load_image_folder(root, image_size)` for
    `root/<class>/<image>` trees such as mini-ImageNet.
  * `splits`: seeded class-balanced subsets and stratified splits.
  * `datasets`: `DataConfig` and `build_datasets(config) -> Splits` (batched
    `tf.data` pipelines of uint8 images and int32 labels).
  * `complexity_batching`: training batches of one complexity bin each
    (`DataConfig.batch_grouping='complexity_bin'`).
  * `protocols`: the paper's per-dataset protocols as `DataConfig` presets.
"""
