//! Hostile or corrupt SAE inputs: one clear error naming the file, never a panic or a huge allocation.

use saekit_sae::format::save_saelens;
use saekit_sae::source::NpySource;
use saekit_sae::{load_sae, Activation, Sae};
use std::io::Write;
use std::path::Path;

fn npy_with_header(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(h.len() as u16).to_le_bytes()).unwrap();
    f.write_all(h.as_bytes()).unwrap();
    f.write_all(data).unwrap();
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted a bad input"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn npy_shape_whose_size_overflows_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("acts.npy");
    // rows * d_in * 4 wraps to 4 bytes on 64-bit: the old length check passed and reads went out of bounds
    let rows = (1usize << 62) + 1;
    npy_with_header(&p, &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 1), }}"), &[0; 64]);
    let e = err_of(NpySource::open(&p, 0, false));
    assert!(e.contains("acts.npy") && e.contains("shorter than its header"), "{e}");
    // a declared header length past the file
    let mut b = std::fs::read(&p).unwrap();
    b[6] = 2;
    b.splice(8..10, [0xff, 0xff, 0xff, 0x7f]).for_each(drop);
    std::fs::write(&p, &b).unwrap();
    let e = err_of(NpySource::open(&p, 0, false));
    assert!(e.contains("acts.npy") && e.contains("header"), "{e}");
}

/// A `.npz` whose one array declares a shape of `dims` but holds `data`.
fn npz_with(path: &Path, name: &str, dims: &str, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    z.start_file(format!("{name}.npy"), zip::write::FileOptions::default()).unwrap();
    let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    z.write_all(b"\x93NUMPY\x01\x00").unwrap();
    z.write_all(&(h.len() as u16).to_le_bytes()).unwrap();
    z.write_all(h.as_bytes()).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap();
}

#[test]
fn npz_header_cannot_size_an_allocation() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("params.npz");
    // 2^40 floats declared, 16 bytes stored: the old reader reserved what the header said (4 TiB)
    npz_with(&p, "W_enc", "1048576, 1048576", &[0; 16]);
    let e = err_of(load_sae(&p));
    assert!(e.contains("params.npz") && e.contains("W_enc") && e.contains("16 bytes"), "{e}");
    // a product that overflows u64
    npz_with(&p, "W_enc", "18446744073709551615, 3", &[0; 16]);
    let e = err_of(load_sae(&p));
    assert!(e.contains("params.npz") && e.contains("W_enc"), "{e}");
    std::fs::write(&p, b"PK\x03\x04 not really a zip").unwrap();
    let e = err_of(load_sae(&p));
    assert!(e.contains("params.npz"), "{e}");
}

#[test]
fn topk_k_and_widths_are_checked() {
    let t = tempfile::tempdir().unwrap();
    let s = Sae::init(6, 10, Activation::TopK { k: 3 }, 1.0, 1);
    save_saelens(t.path(), &s, None, None).unwrap();
    // edited by hand below, as a folder from another tool would be: no saekit file list to contradict
    std::fs::remove_file(t.path().join(saekit_sae::format::FILE_LIST)).unwrap();
    let cfg_path = t.path().join("cfg.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["metadata"].as_object_mut().unwrap().remove("saekit_file_list");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_eq!(load_sae(t.path()).unwrap().activation, Activation::TopK { k: 3 });
    for k in [11u64, 0] {
        cfg["k"] = serde_json::json!(k);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let e = err_of(load_sae(t.path()));
        assert!(e.contains("cfg.json") || e.contains(&t.path().display().to_string()), "{e}");
        assert!(e.contains(&format!("k = {k}")) && e.contains("1..=10"), "{e}");
    }
    // an empty SAE: every width zero, tensors of zero elements
    let empty = Sae {
        d_in: 0,
        d_sae: 0,
        activation: Activation::Relu,
        params: Default::default(),
        apply_b_dec_to_input: true,
        metadata: Default::default(),
    };
    let t2 = tempfile::tempdir().unwrap();
    save_saelens(t2.path(), &empty, None, None).unwrap();
    let e = err_of(load_sae(t2.path()));
    assert!(e.contains("empty SAE"), "{e}");
}
