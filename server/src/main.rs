fn main() {
    println!("vlm-server");
}
